// tap-read: the TAP-to-guest ceiling. Creates (or attaches) a TAP the way virtio-netd opens it
// (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, vnet header 12 bytes), brings it up, and read()s frames from
// it in a plain loop, one frame per call, doing nothing with them: what one core can take out of a
// TAP with no guest behind it.
//
// Usage: tap-read -i IFNAME [-t SECONDS]
// Prints "tap-read: ready on IFNAME" once the TAP is up, the frames read in each second
// ("tap-read: second N: F frames/s") while frames arrive, and a total at the end. Stops after
// SECONDS, or on SIGINT/SIGTERM. Run it in the namespace the TAP is to live in.
// Build: gcc -O2 -Wall -o tap-read tap-read.c
#define _GNU_SOURCE
#include "bench-tap.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>


static volatile sig_atomic_t stopping;
static void on_signal(int signo) { (void)signo; stopping = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    const char *ifname = NULL;
    double seconds = 0;
    int option;
    while ((option = getopt(argc, argv, "i:t:h")) != -1) {
        switch (option) {
        case 'i': ifname = optarg; break;
        case 't': seconds = strtod(optarg, NULL); break;
        default: fprintf(stderr, "usage: tap-read -i IFNAME [-t SECONDS]\n"); return 2;
        }
    }
    if (!ifname || optind != argc || strlen(ifname) >= IFNAMSIZ) {
        fprintf(stderr, "usage: tap-read -i IFNAME [-t SECONDS]  (IFNAME at most %d bytes)\n", IFNAMSIZ - 1);
        return 2;
    }

    int fd = bench_open_tap("tap-read", ifname, 0);
    if (fd < 0) return 1;

    struct sigaction action = {.sa_handler = on_signal};  // no SA_RESTART: read returns EINTR
    sigaction(SIGINT, &action, NULL);
    sigaction(SIGTERM, &action, NULL);
    if (seconds > 0) {
        sigaction(SIGALRM, &action, NULL);
        alarm((unsigned)seconds + (seconds > (unsigned)seconds));
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("tap-read: ready on %s\n", ifname);

    static char buffer[VNET_HEADER_SIZE + 65536];
    unsigned long long frames = 0, bytes = 0, frames_at_report = 0;
    double start = 0, next_report = 0;
    int second = 0;
    while (!stopping) {
        ssize_t n = read(fd, buffer, sizeof buffer);
        if (n < 0) {
            if (errno == EINTR) continue;
            fprintf(stderr, "tap-read: read %s: %s\n", ifname, strerror(errno));
            return 1;
        }
        if (n < VNET_HEADER_SIZE) { fprintf(stderr, "tap-read: short read of %zd bytes\n", n); return 1; }
        if (frames++ == 0) { start = now(); next_report = start + 1; }
        bytes += (unsigned long long)(n - VNET_HEADER_SIZE);
        if ((frames & 1023) == 0) {
            double t = now();
            if (t >= next_report) {
                printf("tap-read: second %d: %llu frames/s\n", ++second, frames - frames_at_report);
                frames_at_report = frames;
                next_report += 1;
            }
        }
    }
    double elapsed = frames ? now() - start : 0;
    printf("tap-read: read %llu frames (%llu bytes of frames) in %.3f s from the first frame: %.0f frames/s\n",
           frames, bytes, elapsed, elapsed > 0 ? frames / elapsed : 0);
    return 0;
}
