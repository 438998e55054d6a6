// Shared by the benchmark's TAP tools (tap-read.c, tap-write.c): opens a TAP the way virtio-netd does
// (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, vnet header VNET_HEADER_SIZE bytes), creating it if it does not
// exist, and brings its link up. Errors go to stderr prefixed with `tool`.
#ifndef BENCH_TAP_H
#define BENCH_TAP_H

#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define VNET_HEADER_SIZE 12

// The TAP's fd (opened with O_RDWR | O_CLOEXEC | `extra_open_flags`), or -1.
static int bench_open_tap(const char *tool, const char *ifname, int extra_open_flags) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | extra_open_flags);
    if (fd < 0) { fprintf(stderr, "%s: open /dev/net/tun: %s\n", tool, strerror(errno)); return -1; }
    struct ifreq request = {0};
    strncpy(request.ifr_name, ifname, IFNAMSIZ - 1);
    request.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if (ioctl(fd, TUNSETIFF, &request) < 0) { fprintf(stderr, "%s: TUNSETIFF %s: %s\n", tool, ifname, strerror(errno)); return -1; }
    int header_size = VNET_HEADER_SIZE;
    if (ioctl(fd, TUNSETVNETHDRSZ, &header_size) < 0) { fprintf(stderr, "%s: TUNSETVNETHDRSZ: %s\n", tool, strerror(errno)); return -1; }

    // Link up (SIOCSIFFLAGS through any socket of this namespace).
    int control = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (control < 0) { fprintf(stderr, "%s: socket: %s\n", tool, strerror(errno)); return -1; }
    struct ifreq flags = {0};
    memcpy(flags.ifr_name, request.ifr_name, IFNAMSIZ);
    if (ioctl(control, SIOCGIFFLAGS, &flags) < 0) { fprintf(stderr, "%s: SIOCGIFFLAGS: %s\n", tool, strerror(errno)); return -1; }
    flags.ifr_flags |= IFF_UP;
    if (ioctl(control, SIOCSIFFLAGS, &flags) < 0) { fprintf(stderr, "%s: SIOCSIFFLAGS (up): %s\n", tool, strerror(errno)); return -1; }
    close(control);
    return fd;
}

#endif
