// TAP device control: the TUN/TAP and interface ioctls, whose request numbers are function-like
// macros Swift cannot import, and struct ifreq, whose union Swift handles awkwardly. Each function
// takes plain types and is one ioctl (or syscall); it returns -1 with errno set on failure, so that
// EINTR retries and error typing stay in Swift (Sys's wrappers).
#ifndef CVIRTIO_SHIM_TAP_H
#define CVIRTIO_SHIM_TAP_H

// Interface names are at most IFNAMSIZ - 1 bytes plus a NUL.
extern const int CVS_IFNAMSIZ;

// TUNSETIFF / TUNGETIFF / TUNSETQUEUE flags (struct ifreq's ifr_flags), widened to int: the kernel's
// field is a short and IFF_TUN_EXCL (0x8000) does not fit a signed short.
extern const int CVS_IFF_TUN;
extern const int CVS_IFF_TAP;
extern const int CVS_IFF_NO_PI;
extern const int CVS_IFF_VNET_HDR;
extern const int CVS_IFF_MULTI_QUEUE;
extern const int CVS_IFF_ATTACH_QUEUE;
extern const int CVS_IFF_DETACH_QUEUE;
extern const int CVS_IFF_TUN_EXCL;
extern const int CVS_IFF_PERSIST;

// Interface flag for SIOCGIFFLAGS / SIOCSIFFLAGS.
extern const int CVS_IFF_UP;

// TUNSETOFFLOAD bits. TUN_F_USO4/6 (Linux 6.2) are defined here when the headers predate them.
extern const unsigned int CVS_TUN_F_CSUM;
extern const unsigned int CVS_TUN_F_TSO4;
extern const unsigned int CVS_TUN_F_TSO6;
extern const unsigned int CVS_TUN_F_TSO_ECN;
extern const unsigned int CVS_TUN_F_UFO;
extern const unsigned int CVS_TUN_F_USO4;
extern const unsigned int CVS_TUN_F_USO6;

// setns(2) namespace type for network namespaces.
extern const int CVS_CLONE_NEWNET;

// TUNSETIFF: creates or attaches `name` (may be a template such as "tap%d") with `flags`.
// `actual_name_out` (CVS_IFNAMSIZ bytes) receives the kernel's name, NUL-terminated.
int cvs_tap_set_iff(int fd, const char *name, int flags, char *actual_name_out);
// TUNGETIFF: the attached device's name (CVS_IFNAMSIZ bytes) and flags (as an unsigned short).
int cvs_tap_get_iff(int fd, char *name_out, int *flags_out);
// TUNGETFEATURES: the IFF_* flags this kernel's tun driver supports.
int cvs_tap_get_features(int fd, unsigned int *features_out);
// TUNSETVNETHDRSZ.
int cvs_tap_set_vnet_hdr_size(int fd, int size);
// TUNSETOFFLOAD with TUN_F_* bits.
int cvs_tap_set_offload(int fd, unsigned int offloads);
// TUNSETQUEUE with CVS_IFF_ATTACH_QUEUE or CVS_IFF_DETACH_QUEUE.
int cvs_tap_set_queue(int fd, int flags);
// TUNSETPERSIST.
int cvs_tap_set_persist(int fd, int persist);

// Interface ioctls on any socket (they act in the socket's network namespace).
int cvs_if_get_index(int sock, const char *name, int *index_out);
int cvs_if_get_mtu(int sock, const char *name, int *mtu_out);
int cvs_if_set_mtu(int sock, const char *name, int mtu);
int cvs_if_get_flags(int sock, const char *name, int *flags_out);
int cvs_if_set_flags(int sock, const char *name, int flags);

// setns(2), declared only under _GNU_SOURCE: TUNSETIFF and sockets act in the calling thread's
// network namespace, so a thread enters a namespace before opening a TAP in it.
int cvs_setns(int fd, int nstype);

// A netlink socket (non-blocking, close-on-exec) readable whenever a link of the calling thread's
// network namespace is added, changed or removed (RTMGRP_LINK).
int cvs_link_monitor_open(void);

#endif
