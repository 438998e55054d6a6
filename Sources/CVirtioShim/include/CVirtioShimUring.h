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
// Queues a writev (or readv) of `iov` on `fd`; -1 when the submission queue is full.
int cvs_uring_prep_writev(cvs_uring *ring, int fd, const struct iovec *iov, unsigned count, uint64_t user_data);
int cvs_uring_prep_readv(cvs_uring *ring, int fd, const struct iovec *iov, unsigned count, uint64_t user_data);
// Submits what was queued and waits until `wait` completions are ready; the submitted count, or -1.
int cvs_uring_submit_and_wait(cvs_uring *ring, unsigned wait);
// Takes the next completion: 1 with its user data and result (bytes, or -errno), 0 if none.
int cvs_uring_next_completion(cvs_uring *ring, uint64_t *user_data, int32_t *result);

#endif
