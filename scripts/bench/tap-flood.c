// tap-flood: sends one fixed Ethernet frame, over and over, out of a network interface (for the
// benchmark: into a TAP, whose reader is the backend under test). A packet socket bound to the
// interface, PACKET_QDISC_BYPASS (straight to the driver, no qdisc), sendmmsg batches.
//
// The frame: to DST-MAC from 52:54:00:00:00:02, IPv4 UDP 198.18.0.2:9 -> 198.18.0.1:9 (the
// benchmarking range; run it inside a network namespace so nothing leaves it), SIZE bytes long
// without FCS.
//
// Usage: tap-flood -i IFNAME -d DST-MAC -s SIZE [-t SECONDS | -n COUNT] [-b BATCH] [-w MICROSECONDS]
// Prints the frames sent in each second ("tap-flood: second N: F frames/s") and a total at the end.
// When the driver refuses a batch (ENOBUFS: the TAP's queue is full, its reader is behind), it waits
// -w MICROSECONDS (default 0: retry at once) before trying again, so that a consumer sharing its core
// gets the CPU meanwhile. A frame the driver takes and then drops counts as sent: the TAP's tx_dropped
// counter tells those apart. Stops after SECONDS, COUNT frames, or on SIGINT/SIGTERM.
// Build: gcc -O2 -Wall -o tap-flood tap-flood.c
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 1024
#define MAX_SIZE 9018

static volatile sig_atomic_t stopping;
static void on_signal(int signo) { (void)signo; stopping = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void usage(void) {
    fprintf(stderr, "usage: tap-flood -i IFNAME -d DST-MAC -s SIZE [-t SECONDS | -n COUNT] [-b BATCH] [-w MICROSECONDS]\n"
                    "  SIZE: frame length without FCS, 42..%d; BATCH: frames per sendmmsg, 1..%d (default 64)\n"
                    "  MICROSECONDS: pause after the TAP refused a batch (default 0)\n",
            MAX_SIZE, MAX_BATCH);
    exit(2);
}

static uint16_t ip_checksum(const uint8_t *header, size_t length) {
    uint32_t sum = 0;
    for (size_t i = 0; i + 1 < length; i += 2) sum += (uint32_t)header[i] << 8 | header[i + 1];
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

// Ethernet + IPv4 + UDP to port 9 (discard), payload zero.
static void build_frame(uint8_t *frame, size_t size, const uint8_t dst[6]) {
    static const uint8_t src[6] = {0x52, 0x54, 0x00, 0x00, 0x00, 0x02};
    memset(frame, 0, size);
    memcpy(frame, dst, 6);
    memcpy(frame + 6, src, 6);
    frame[12] = 0x08; frame[13] = 0x00;  // IPv4
    uint8_t *ip = frame + 14;
    size_t ip_length = size - 14, udp_length = size - 34;
    ip[0] = 0x45;                                   // version 4, 20-byte header
    ip[2] = ip_length >> 8; ip[3] = ip_length & 0xff;
    ip[6] = 0x40;                                   // don't fragment
    ip[8] = 64;                                     // TTL
    ip[9] = 17;                                     // UDP
    const uint8_t source[4] = {198, 18, 0, 2}, destination[4] = {198, 18, 0, 1};
    memcpy(ip + 12, source, 4);
    memcpy(ip + 16, destination, 4);
    uint16_t checksum = ip_checksum(ip, 20);
    ip[10] = checksum >> 8; ip[11] = checksum & 0xff;
    uint8_t *udp = ip + 20;
    udp[1] = 9; udp[3] = 9;                         // ports 9 -> 9
    udp[4] = udp_length >> 8; udp[5] = udp_length & 0xff;
    // UDP checksum 0: none (allowed for IPv4).
}

int main(int argc, char **argv) {
    const char *ifname = NULL, *mac_text = NULL;
    long size = 0, batch = 64, backoff_us = 0;
    double seconds = 0;
    unsigned long long count = 0;
    int option;
    while ((option = getopt(argc, argv, "i:d:s:t:n:b:w:h")) != -1) {
        switch (option) {
        case 'i': ifname = optarg; break;
        case 'd': mac_text = optarg; break;
        case 's': size = strtol(optarg, NULL, 10); break;
        case 't': seconds = strtod(optarg, NULL); break;
        case 'n': count = strtoull(optarg, NULL, 10); break;
        case 'b': batch = strtol(optarg, NULL, 10); break;
        case 'w': backoff_us = strtol(optarg, NULL, 10); break;
        default: usage();
        }
    }
    if (!ifname || !mac_text || optind != argc) usage();
    if (size < 42 || size > MAX_SIZE) { fprintf(stderr, "tap-flood: SIZE must be 42..%d\n", MAX_SIZE); return 2; }
    if (batch < 1 || batch > MAX_BATCH) { fprintf(stderr, "tap-flood: BATCH must be 1..%d\n", MAX_BATCH); return 2; }
    if (backoff_us < 0 || backoff_us > 1000000) { fprintf(stderr, "tap-flood: MICROSECONDS must be 0..1000000\n"); return 2; }
    if ((seconds <= 0) == (count == 0)) { fprintf(stderr, "tap-flood: give one of -t SECONDS or -n COUNT\n"); return 2; }
    uint8_t dst[6];
    if (sscanf(mac_text, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &dst[0], &dst[1], &dst[2], &dst[3], &dst[4], &dst[5]) != 6) {
        fprintf(stderr, "tap-flood: %s is not a MAC address like 52:54:00:00:00:01\n", mac_text);
        return 2;
    }
    unsigned ifindex = if_nametoindex(ifname);
    if (ifindex == 0) { fprintf(stderr, "tap-flood: interface %s: %s\n", ifname, strerror(errno)); return 1; }

    // Protocol 0: this socket only sends (it receives nothing).
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (fd < 0) { perror("tap-flood: socket(AF_PACKET)"); return 1; }
    struct sockaddr_ll address = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_IP), .sll_ifindex = (int)ifindex,
                                  .sll_halen = 6};
    memcpy(address.sll_addr, dst, 6);
    if (bind(fd, (struct sockaddr *)&address, sizeof address) < 0) { perror("tap-flood: bind"); return 1; }
    int one = 1;
    if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof one) < 0) {
        perror("tap-flood: setsockopt(PACKET_QDISC_BYPASS)");
        return 1;
    }

    static uint8_t frame[MAX_SIZE];
    build_frame(frame, (size_t)size, dst);
    static struct iovec iov;
    static struct mmsghdr messages[MAX_BATCH];
    iov.iov_base = frame;
    iov.iov_len = (size_t)size;
    for (long i = 0; i < batch; i++) {
        messages[i].msg_hdr.msg_name = &address;
        messages[i].msg_hdr.msg_namelen = sizeof address;
        messages[i].msg_hdr.msg_iov = &iov;
        messages[i].msg_hdr.msg_iovlen = 1;
    }

    struct sigaction action = {.sa_handler = on_signal};  // no SA_RESTART: sendmmsg returns EINTR
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    prctl(PR_SET_TIMERSLACK, 1000UL);  // 1 us: pauses as short as asked
    const struct timespec backoff = {.tv_sec = backoff_us / 1000000, .tv_nsec = backoff_us % 1000000 * 1000};

    double start = now(), end = seconds > 0 ? start + seconds : 0, next_report = start + 1;
    unsigned long long sent = 0, sent_at_report = 0, refused = 0;
    int second = 0;
    while (!stopping && (count == 0 || sent < count)) {
        unsigned want = (unsigned)batch;
        if (count && count - sent < want) want = (unsigned)(count - sent);
        int n = sendmmsg(fd, messages, want, 0);
        if (n >= 0) {
            sent += (unsigned)n;
        } else if (errno == ENOBUFS || errno == EAGAIN) {  // the TAP's queue is full: try again (after a pause)
            refused++;
            if (backoff_us) nanosleep(&backoff, NULL);
        } else if (errno != EINTR) {
            fprintf(stderr, "tap-flood: sendmmsg on %s: %s\n", ifname, strerror(errno));
            return 1;
        }
        double t = now();
        if (t >= next_report) {
            printf("tap-flood: second %d: %llu frames/s\n", ++second, sent - sent_at_report);
            sent_at_report = sent;
            next_report += 1;
        }
        if (end && t >= end) break;
    }
    double elapsed = now() - start;
    printf("tap-flood: sent %llu frames of %ld bytes in %.3f s: %.0f frames/s (%llu sendmmsg calls refused with ENOBUFS/EAGAIN)\n",
           sent, size, elapsed, elapsed > 0 ? sent / elapsed : 0, refused);
    return 0;
}
