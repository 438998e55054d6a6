#define _GNU_SOURCE
#include "CVirtioShimSocket.h"
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

const int CVS_MAX_FDS_PER_MESSAGE = 8;

ssize_t cvs_recv_with_fds(int sock, void *buffer, size_t length, int *fds, int max_fds, int *fd_count, int *truncated) {
    char control[CMSG_SPACE(sizeof(int) * 8)];
    struct iovec iov = { .iov_base = buffer, .iov_len = length };
    struct msghdr msg = { 0 };
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    *fd_count = 0;
    *truncated = 0;
    ssize_t received = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (received < 0) return -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *incoming = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (*fd_count < max_fds) {
                fds[(*fd_count)++] = incoming[i];
            } else {
                close(incoming[i]);  // more than the caller can take: never leak it
                *truncated = 1;
            }
        }
    }
    if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)) *truncated = 1;
    return received;
}

ssize_t cvs_send_with_fds(int sock, const void *buffer, size_t length, const int *fds, int fd_count) {
    struct iovec iov = { .iov_base = (void *)buffer, .iov_len = length };
    struct msghdr msg = { 0 };
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    char control[CMSG_SPACE(sizeof(int) * 8)];
    if (fd_count > 0) {
        if (fd_count > 8) { errno = EINVAL; return -1; }
        memset(control, 0, sizeof(control));
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * fd_count);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * fd_count);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * fd_count);
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

static int fill_address(struct sockaddr_un *address, const char *path) {
    memset(address, 0, sizeof(*address));
    address->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(address->sun_path)) { errno = ENAMETOOLONG; return -1; }
    strcpy(address->sun_path, path);
    return 0;
}

int cvs_unix_listen(const char *path, int backlog) {
    struct sockaddr_un address;
    if (fill_address(&address, path) < 0) return -1;
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -1;
    if (bind(sock, (struct sockaddr *)&address, sizeof(address)) < 0 || listen(sock, backlog) < 0) {
        int saved = errno;
        close(sock);
        errno = saved;
        return -1;
    }
    return sock;
}

int cvs_unix_connect(const char *path) {
    struct sockaddr_un address;
    if (fill_address(&address, path) < 0) return -1;
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -1;
    if (connect(sock, (struct sockaddr *)&address, sizeof(address)) < 0) {
        int saved = errno;
        close(sock);
        errno = saved;
        return -1;
    }
    return sock;
}

int cvs_accept_cloexec(int sock) { return accept4(sock, NULL, NULL, SOCK_CLOEXEC); }
