// Unix sockets with file descriptors passed as SCM_RIGHTS: CMSG_* are macros Swift cannot import.
#ifndef CVIRTIO_SHIM_SOCKET_H
#define CVIRTIO_SHIM_SOCKET_H

#include <stddef.h>
#include <sys/types.h>

// recvmsg into `buffer` with MSG_CMSG_CLOEXEC. Up to `max_fds` received descriptors go to `fds`
// and their count to `*fd_count`; `*truncated` is set when the kernel dropped control data
// (MSG_CTRUNC) or data (MSG_TRUNC). Returns the byte count, or -1 with errno.
ssize_t cvs_recv_with_fds(int sock, void *buffer, size_t length, int *fds, int max_fds, int *fd_count, int *truncated);
// sendmsg of `buffer` with `fd_count` descriptors attached (0 for none). MSG_NOSIGNAL.
ssize_t cvs_send_with_fds(int sock, const void *buffer, size_t length, const int *fds, int fd_count);
// socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC) bound or connected to `path`.
int cvs_unix_listen(const char *path, int backlog);
int cvs_unix_connect(const char *path);
// accept4 with SOCK_CLOEXEC.
int cvs_accept_cloexec(int sock);
// The most descriptors one message may carry here (vhost-user sends at most 8).
extern const int CVS_MAX_FDS_PER_MESSAGE;

#endif
