// tap-write: the guest-to-TAP ceiling. Creates a TAP the way virtio-netd opens it (IFF_TAP | IFF_NO_PI |
// IFF_VNET_HDR, vnet header 12 bytes), brings it up, and writes the same frames into it in a loop, as
// fast as one core can: what the kernel takes when the frames are already in the writer's cache and no
// guest ring has to be read. The frames are what testpmd's txonly mode sends (Ethernet to
// 02:00:00:00:00:00, IPv4 198.18.0.1 -> 198.18.0.2, UDP 9 -> 9), so the kernel does the same work
// with them as with a frontend's.
//   -m uring   batches of 64 in one io_uring_enter, the TAP fd registered as a fixed file, one
//              IORING_OP_WRITE per frame: the calls virtio-netd makes (raw syscalls, no liburing)
//   -m writev  one writev per frame: the calls DPDK's tap PMD makes
//
// Usage: tap-write -i IFNAME -s FRAME_BYTES [-m uring|writev] [-t SECONDS]
// Prints "tap-write: ready on IFNAME" once the TAP is up, then writes until SECONDS pass or SIGINT or
// SIGTERM, and prints the total. The caller counts frames with the TAP's rx_packets. Run it in the
// namespace the TAP is to live in. Build: gcc -O2 -Wall -o tap-write tap-write.c
#define _GNU_SOURCE
#include "bench-tap.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <linux/io_uring.h>
#include <net/if.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define BATCH 64

static volatile sig_atomic_t stopping;
static void on_signal(int signo) { (void)signo; stopping = 1; }

static void build_frame(unsigned char *frame, int size) {
    memset(frame, 0, size);
    static const unsigned char ethernet[14] = {0x02, 0, 0, 0, 0, 0, 0x52, 0x54, 0, 0, 0, 0x01, 0x08, 0x00};
    memcpy(frame, ethernet, 14);
    unsigned char *ip = frame + 14;
    int ip_length = size - 14;
    ip[0] = 0x45;
    ip[2] = ip_length >> 8, ip[3] = ip_length & 0xff;
    ip[8] = 64, ip[9] = 17;
    ip[12] = 198, ip[13] = 18, ip[14] = 0, ip[15] = 1;
    ip[16] = 198, ip[17] = 18, ip[18] = 0, ip[19] = 2;
    uint32_t sum = 0;
    for (int i = 0; i < 20; i += 2) sum += (ip[i] << 8) | ip[i + 1];
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    sum = ~sum & 0xffff;
    ip[10] = sum >> 8, ip[11] = sum & 0xff;
    unsigned char *udp = ip + 20;
    int udp_length = ip_length - 20;
    udp[1] = 9, udp[3] = 9;
    udp[4] = udp_length >> 8, udp[5] = udp_length & 0xff;  // checksum 0: none, as testpmd sends
}

struct ring {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
};

static int ring_setup(struct ring *ring, int tap) {
    struct io_uring_params params = {0};
    ring->fd = (int)syscall(__NR_io_uring_setup, 256, &params);
    if (ring->fd < 0) { perror("tap-write: io_uring_setup"); return -1; }
    if (!(params.features & IORING_FEAT_SINGLE_MMAP)) { fprintf(stderr, "tap-write: io_uring without SINGLE_MMAP\n"); return -1; }
    size_t size = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    size_t cq_size = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
    if (cq_size > size) size = cq_size;
    char *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring->fd, IORING_OFF_SQ_RING);
    ring->sqes = mmap(NULL, params.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_POPULATE, ring->fd, IORING_OFF_SQES);
    if (map == MAP_FAILED || ring->sqes == MAP_FAILED) { perror("tap-write: mmap io_uring"); return -1; }
    ring->sq_tail = (unsigned *)(map + params.sq_off.tail);
    ring->sq_mask = (unsigned *)(map + params.sq_off.ring_mask);
    ring->sq_array = (unsigned *)(map + params.sq_off.array);
    ring->cq_head = (unsigned *)(map + params.cq_off.head);
    ring->cq_tail = (unsigned *)(map + params.cq_off.tail);
    ring->cq_mask = (unsigned *)(map + params.cq_off.ring_mask);
    ring->cqes = (struct io_uring_cqe *)(map + params.cq_off.cqes);
    if (syscall(__NR_io_uring_register, ring->fd, IORING_REGISTER_FILES, &tap, 1) < 0) {
        perror("tap-write: IORING_REGISTER_FILES");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    const char *ifname = NULL, *mode = "uring";
    int size = 0;
    double seconds = 0;
    int option;
    while ((option = getopt(argc, argv, "i:s:m:t:h")) != -1) {
        switch (option) {
        case 'i': ifname = optarg; break;
        case 's': size = atoi(optarg); break;
        case 'm': mode = optarg; break;
        case 't': seconds = strtod(optarg, NULL); break;
        default: fprintf(stderr, "usage: tap-write -i IFNAME -s FRAME_BYTES [-m uring|writev] [-t SECONDS]\n"); return 2;
        }
    }
    int use_uring = strcmp(mode, "uring") == 0;
    if (!ifname || optind != argc || strlen(ifname) >= IFNAMSIZ || size < 60 || size > 1514 ||
        (!use_uring && strcmp(mode, "writev") != 0)) {
        fprintf(stderr, "usage: tap-write -i IFNAME -s FRAME_BYTES [-m uring|writev] [-t SECONDS]"
                        "  (IFNAME at most %d bytes, FRAME_BYTES 60..1514)\n", IFNAMSIZ - 1);
        return 2;
    }

    int fd = bench_open_tap("tap-write", ifname, O_NONBLOCK);
    if (fd < 0) return 1;

    static unsigned char buffers[BATCH][VNET_HEADER_SIZE + 1514];
    struct iovec iovecs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        memset(buffers[i], 0, VNET_HEADER_SIZE);
        build_frame(buffers[i] + VNET_HEADER_SIZE, size);
        iovecs[i].iov_base = buffers[i];
        iovecs[i].iov_len = VNET_HEADER_SIZE + size;
    }
    struct ring ring = {0};
    if (use_uring && ring_setup(&ring, fd) < 0) return 1;

    struct sigaction action = {.sa_handler = on_signal};
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    if (seconds > 0) {
        sigaction(SIGALRM, &action, NULL);
        alarm((unsigned)seconds + (seconds > (unsigned)seconds));
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("tap-write: ready on %s (%s, %d-byte frames)\n", ifname, mode, size);

    unsigned long long written = 0, refused = 0;
    while (!stopping) {
        if (!use_uring) {
            for (int i = 0; i < BATCH; i++) {
                if (writev(fd, &iovecs[i], 1) >= 0) written++;
                else if (errno != EINTR) refused++;
            }
            continue;
        }
        unsigned tail = *ring.sq_tail;
        for (unsigned i = 0; i < BATCH; i++) {
            unsigned index = (tail + i) & *ring.sq_mask;
            struct io_uring_sqe *sqe = &ring.sqes[index];
            memset(sqe, 0, sizeof *sqe);
            sqe->opcode = IORING_OP_WRITE;
            sqe->flags = IOSQE_FIXED_FILE;
            sqe->fd = 0;
            sqe->addr = (uint64_t)(uintptr_t)iovecs[i].iov_base;
            sqe->len = (uint32_t)iovecs[i].iov_len;
            ring.sq_array[index] = index;
        }
        __atomic_store_n(ring.sq_tail, tail + BATCH, __ATOMIC_RELEASE);
        if (syscall(__NR_io_uring_enter, ring.fd, BATCH, BATCH, IORING_ENTER_GETEVENTS, NULL, 0) < 0 && errno != EINTR) {
            perror("tap-write: io_uring_enter");
            return 1;
        }
        unsigned head = *ring.cq_head, end = __atomic_load_n(ring.cq_tail, __ATOMIC_ACQUIRE);
        for (; head != end; head++) {
            if (ring.cqes[head & *ring.cq_mask].res >= 0) written++;
            else refused++;
        }
        __atomic_store_n(ring.cq_head, head, __ATOMIC_RELEASE);
    }
    printf("tap-write: wrote %llu frames, %llu refused\n", written, refused);
    return 0;
}
