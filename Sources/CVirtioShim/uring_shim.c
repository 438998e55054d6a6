#define _GNU_SOURCE
#include "CVirtioShimUring.h"
#include <errno.h>
#include <linux/fs.h>
#include <linux/io_uring.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

struct cvs_uring {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    struct io_uring_sqe *sqes;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    unsigned pending;  // queued, not yet submitted
    int registered_fd; // the file registered as fixed file 0, or -1
    void *sq_map, *cq_map;
    size_t sq_map_size, cq_map_size, sqes_size;
};

cvs_uring *cvs_uring_create(unsigned entries) {
    struct io_uring_params params;
    memset(&params, 0, sizeof(params));
    int fd = (int)syscall(__NR_io_uring_setup, entries, &params);
    if (fd < 0) return NULL;
    cvs_uring *ring = calloc(1, sizeof(*ring));
    if (!ring) { close(fd); errno = ENOMEM; return NULL; }
    ring->fd = fd;
    ring->registered_fd = -1;
    ring->sq_map_size = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    ring->cq_map_size = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
    if (params.features & IORING_FEAT_SINGLE_MMAP) {
        if (ring->cq_map_size > ring->sq_map_size) ring->sq_map_size = ring->cq_map_size;
        ring->cq_map_size = ring->sq_map_size;
    }
    ring->sq_map = mmap(NULL, ring->sq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (ring->sq_map == MAP_FAILED) goto fail;
    if (params.features & IORING_FEAT_SINGLE_MMAP) {
        ring->cq_map = ring->sq_map;
    } else {
        ring->cq_map = mmap(NULL, ring->cq_map_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
        if (ring->cq_map == MAP_FAILED) { ring->cq_map = NULL; goto fail; }
    }
    ring->sqes_size = params.sq_entries * sizeof(struct io_uring_sqe);
    ring->sqes = mmap(NULL, ring->sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (ring->sqes == MAP_FAILED) { ring->sqes = NULL; goto fail; }
    char *sq = ring->sq_map, *cq = ring->cq_map;
    ring->sq_head = (unsigned *)(sq + params.sq_off.head);
    ring->sq_tail = (unsigned *)(sq + params.sq_off.tail);
    ring->sq_mask = (unsigned *)(sq + params.sq_off.ring_mask);
    ring->sq_array = (unsigned *)(sq + params.sq_off.array);
    ring->cq_head = (unsigned *)(cq + params.cq_off.head);
    ring->cq_tail = (unsigned *)(cq + params.cq_off.tail);
    ring->cq_mask = (unsigned *)(cq + params.cq_off.ring_mask);
    ring->cqes = (struct io_uring_cqe *)(cq + params.cq_off.cqes);
    return ring;
fail:
    cvs_uring_destroy(ring);
    errno = ENOMEM;
    return NULL;
}

int cvs_uring_register_file(cvs_uring *ring, int fd) {
    if (ring->registered_fd >= 0) { errno = EBUSY; return -1; }
    if (syscall(__NR_io_uring_register, ring->fd, IORING_REGISTER_FILES, &fd, 1) < 0) return -1;
    ring->registered_fd = fd;
    return 0;
}

void cvs_uring_destroy(cvs_uring *ring) {
    if (!ring) return;
    // Unregistering drops the ring's reference to the file now; left to the ring's asynchronous
    // teardown, a TAP closed by its owner would stay attached (and busy) for a while.
    if (ring->registered_fd >= 0) syscall(__NR_io_uring_register, ring->fd, IORING_UNREGISTER_FILES, NULL, 0);
    if (ring->sqes) munmap(ring->sqes, ring->sqes_size);
    if (ring->cq_map && ring->cq_map != ring->sq_map) munmap(ring->cq_map, ring->cq_map_size);
    if (ring->sq_map && ring->sq_map != MAP_FAILED) munmap(ring->sq_map, ring->sq_map_size);
    close(ring->fd);
    free(ring);
}

static int prep(cvs_uring *ring, int op, int fd, const struct iovec *iov, unsigned count, uint64_t user_data, int link) {
    unsigned head = __atomic_load_n(ring->sq_head, __ATOMIC_ACQUIRE);
    unsigned tail = *ring->sq_tail + ring->pending;
    if (tail - head > *ring->sq_mask) return -1;
    unsigned index = tail & *ring->sq_mask;
    struct io_uring_sqe *sqe = &ring->sqes[index];
    memset(sqe, 0, sizeof(*sqe));
    if (fd == ring->registered_fd) {
        sqe->fd = 0;
        sqe->flags = IOSQE_FIXED_FILE;  // saves the per-request file lookup and reference count
    } else {
        sqe->fd = fd;
    }
    if (count == 1 && (op == IORING_OP_WRITEV || op == IORING_OP_READV)) {
        // One segment: the plain opcode spares the kernel copying and checking an iovec array.
        sqe->opcode = op == IORING_OP_WRITEV ? IORING_OP_WRITE : IORING_OP_READ;
        sqe->addr = (uint64_t)(uintptr_t)iov->iov_base;
        sqe->len = (uint32_t)iov->iov_len;
    } else {
        sqe->opcode = (uint8_t)op;
        sqe->addr = (uint64_t)(uintptr_t)iov;
        sqe->len = count;
    }
    if (op == IORING_OP_WRITEV) sqe->rw_flags = RWF_NOWAIT;
    if (link) sqe->flags |= IOSQE_IO_LINK;
    sqe->user_data = user_data;
    ring->sq_array[index] = index;
    ring->pending++;
    return 0;
}

int cvs_uring_prep_writev(cvs_uring *ring, int fd, const struct iovec *iov, unsigned count, uint64_t user_data, int link) {
    return prep(ring, IORING_OP_WRITEV, fd, iov, count, user_data, link);
}

int cvs_uring_prep_readv(cvs_uring *ring, int fd, const struct iovec *iov, unsigned count, uint64_t user_data) {
    return prep(ring, IORING_OP_READV, fd, iov, count, user_data, 0);
}

int cvs_uring_submit_and_wait(cvs_uring *ring, unsigned wait) {
    unsigned submit = ring->pending;
    __atomic_store_n(ring->sq_tail, *ring->sq_tail + submit, __ATOMIC_RELEASE);
    ring->pending = 0;
    int result;
    do {
        result = (int)syscall(__NR_io_uring_enter, ring->fd, submit, wait, wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
    } while (result < 0 && errno == EINTR);  // the kernel takes at most what is still queued
    return result;
}

int cvs_uring_next_completion(cvs_uring *ring, uint64_t *user_data, int32_t *result) {
    unsigned head = *ring->cq_head;
    if (head == __atomic_load_n(ring->cq_tail, __ATOMIC_ACQUIRE)) return 0;
    struct io_uring_cqe *cqe = &ring->cqes[head & *ring->cq_mask];
    *user_data = cqe->user_data;
    *result = cqe->res;
    __atomic_store_n(ring->cq_head, head + 1, __ATOMIC_RELEASE);
    return 1;
}
