#define _GNU_SOURCE
#include "CVirtioShimTap.h"
#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef TUN_F_USO4
#define TUN_F_USO4 0x20
#endif
#ifndef TUN_F_USO6
#define TUN_F_USO6 0x40
#endif

const int CVS_IFNAMSIZ = IFNAMSIZ;

const int CVS_IFF_TUN = IFF_TUN;
const int CVS_IFF_TAP = IFF_TAP;
const int CVS_IFF_NO_PI = IFF_NO_PI;
const int CVS_IFF_VNET_HDR = IFF_VNET_HDR;
const int CVS_IFF_MULTI_QUEUE = IFF_MULTI_QUEUE;
const int CVS_IFF_ATTACH_QUEUE = IFF_ATTACH_QUEUE;
const int CVS_IFF_DETACH_QUEUE = IFF_DETACH_QUEUE;
const int CVS_IFF_TUN_EXCL = IFF_TUN_EXCL;
const int CVS_IFF_PERSIST = IFF_PERSIST;

const int CVS_IFF_UP = IFF_UP;

const unsigned int CVS_TUN_F_CSUM = TUN_F_CSUM;
const unsigned int CVS_TUN_F_TSO4 = TUN_F_TSO4;
const unsigned int CVS_TUN_F_TSO6 = TUN_F_TSO6;
const unsigned int CVS_TUN_F_TSO_ECN = TUN_F_TSO_ECN;
const unsigned int CVS_TUN_F_UFO = TUN_F_UFO;
const unsigned int CVS_TUN_F_USO4 = TUN_F_USO4;
const unsigned int CVS_TUN_F_USO6 = TUN_F_USO6;

const int CVS_CLONE_NEWNET = CLONE_NEWNET;

// Fills ifr_name; a name that does not fit is EINVAL rather than silently truncated.
static int fill_name(struct ifreq *ifr, const char *name) {
    memset(ifr, 0, sizeof(*ifr));
    if (name == NULL) { errno = EINVAL; return -1; }
    size_t length = strnlen(name, IFNAMSIZ);
    if (length >= IFNAMSIZ) { errno = EINVAL; return -1; }
    memcpy(ifr->ifr_name, name, length);
    return 0;
}

static void copy_name_out(const struct ifreq *ifr, char *name_out) {
    memcpy(name_out, ifr->ifr_name, IFNAMSIZ);
    name_out[IFNAMSIZ - 1] = '\0';
}

int cvs_tap_set_iff(int fd, const char *name, int flags, char *actual_name_out) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) != 0) return -1;
    ifr.ifr_flags = (short)flags;  // the kernel reads the low 16 bits, IFF_TUN_EXCL included
    if (ioctl(fd, TUNSETIFF, &ifr) == -1) return -1;
    if (actual_name_out != NULL) copy_name_out(&ifr, actual_name_out);
    return 0;
}

int cvs_tap_get_iff(int fd, char *name_out, int *flags_out) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    if (ioctl(fd, TUNGETIFF, &ifr) == -1) return -1;
    if (name_out != NULL) copy_name_out(&ifr, name_out);
    if (flags_out != NULL) *flags_out = (unsigned short)ifr.ifr_flags;
    return 0;
}

int cvs_tap_get_features(int fd, unsigned int *features_out) {
    return ioctl(fd, TUNGETFEATURES, features_out);
}

int cvs_tap_set_vnet_hdr_size(int fd, int size) {
    return ioctl(fd, TUNSETVNETHDRSZ, &size);
}

int cvs_tap_set_offload(int fd, unsigned int offloads) {
    return ioctl(fd, TUNSETOFFLOAD, (unsigned long)offloads);
}

int cvs_tap_set_queue(int fd, int flags) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = (short)flags;
    return ioctl(fd, TUNSETQUEUE, &ifr);
}

int cvs_tap_set_persist(int fd, int persist) {
    return ioctl(fd, TUNSETPERSIST, (unsigned long)persist);
}

int cvs_if_get_index(int sock, const char *name, int *index_out) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) != 0) return -1;
    if (ioctl(sock, SIOCGIFINDEX, &ifr) == -1) return -1;
    *index_out = ifr.ifr_ifindex;
    return 0;
}

int cvs_if_get_mtu(int sock, const char *name, int *mtu_out) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) != 0) return -1;
    if (ioctl(sock, SIOCGIFMTU, &ifr) == -1) return -1;
    *mtu_out = ifr.ifr_mtu;
    return 0;
}

int cvs_if_set_mtu(int sock, const char *name, int mtu) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) != 0) return -1;
    ifr.ifr_mtu = mtu;
    return ioctl(sock, SIOCSIFMTU, &ifr);
}

int cvs_if_get_flags(int sock, const char *name, int *flags_out) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) != 0) return -1;
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) == -1) return -1;
    *flags_out = (unsigned short)ifr.ifr_flags;
    return 0;
}

int cvs_if_set_flags(int sock, const char *name, int flags) {
    struct ifreq ifr;
    if (fill_name(&ifr, name) != 0) return -1;
    ifr.ifr_flags = (short)flags;
    return ioctl(sock, SIOCSIFFLAGS, &ifr);
}

int cvs_setns(int fd, int nstype) { return setns(fd, nstype); }

// A netlink socket (non-blocking, close-on-exec) that receives the kernel's link notifications
// (RTMGRP_LINK: links added, changed, removed) for the calling thread's network namespace.
int cvs_link_monitor_open(void) {
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, NETLINK_ROUTE);
    if (fd < 0) return -1;
    struct sockaddr_nl address;
    memset(&address, 0, sizeof(address));
    address.nl_family = AF_NETLINK;
    address.nl_groups = RTMGRP_LINK;
    if (bind(fd, (struct sockaddr *)&address, sizeof(address)) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}
