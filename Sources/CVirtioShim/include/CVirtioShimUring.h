// A minimal io_uring for batched TAP writes and reads, through raw syscalls and the kernel's own
// header (no liburing). One ring per worker thread; not thread-safe.
#ifndef CVIRTIO_SHIM_URING_H
#define CVIRTIO_SHIM_URING_H

#include <stdint.h>
#include <sys/uio.h>

typedef struct cvs_uring cvs_uring;

// Creates a ring with room for `entries` requests; NULL with errno set when io_uring is unavailable.
cvs_uring *cvs_uring_create(unsigned entries);
void cvs_uring_destroy(cvs_uring *ring);
// Registers `fd` as the ring's one fixed file (requests on it then skip the kernel's file lookup);
// 0, or -1 with errno set. The ring drops it when destroyed.
int cvs_uring_register_file(cvs_uring *ring, int fd);
// Queues a writev (or readv) of `iov` on `fd` (a plain write or read for one segment); -1 when the
// submission queue is full. Writes never wait: one the file cannot take now completes with -EAGAIN
// (RWF_NOWAIT) instead of being retried by the kernel later, out of order. With `link`, the next
// request queued runs only if this one succeeds (IOSQE_IO_LINK): after a failure the rest of the
// link completes with -ECANCELED, untouched.
int cvs_uring_prep_writev(cvs_uring *ring, int fd, const struct iovec *iov, unsigned count, uint64_t user_data, int link);
int cvs_uring_prep_readv(cvs_uring *ring, int fd, const struct iovec *iov, unsigned count, uint64_t user_data);
// Submits what was queued and waits until `wait` completions are ready; the submitted count, or -1.
int cvs_uring_submit_and_wait(cvs_uring *ring, unsigned wait);
// Takes the next completion: 1 with its user data and result (bytes, or -errno), 0 if none.
int cvs_uring_next_completion(cvs_uring *ring, uint64_t *user_data, int32_t *result);

// Starts loading the first `limit` bytes that `iov` describes into the cache, so that the copy which
// follows (the kernel's, for a TAP write) does not wait on each line in turn.
static inline void cvs_prefetch_iovecs(const struct iovec *iov, unsigned count, size_t limit) {
    for (unsigned i = 0; i < count && limit > 0; i++) {
        const char *base = (const char *)iov[i].iov_base;
        size_t length = iov[i].iov_len < limit ? iov[i].iov_len : limit;
        for (size_t offset = 0; offset < length; offset += 64) __builtin_prefetch(base + offset, 0, 3);
        if (length > 0) __builtin_prefetch(base + length - 1, 0, 3);
        limit -= length;
    }
}

#endif
