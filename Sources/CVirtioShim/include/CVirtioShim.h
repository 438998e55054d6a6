// The few things Swift cannot import from Glibc on its own: GNU-only syscalls (declared only under
// _GNU_SOURCE), ioctl request macros, and acquire/release access to raw shared memory.
#ifndef CVIRTIO_SHIM_H
#define CVIRTIO_SHIM_H

#include <stdint.h>
#include <stddef.h>
#include <sys/uio.h>
#include <sys/epoll.h>

// Syscalls whose declarations need _GNU_SOURCE; each returns -1 and sets errno on failure.
int cvs_memfd_create(const char *name, unsigned int flags);
int cvs_eventfd(unsigned int initval, int flags);
/// Names the calling thread (15 bytes at most), for ps, top and perf.
int cvs_set_thread_name(const char *name);

extern const unsigned int CVS_MFD_CLOEXEC;
extern const unsigned int CVS_MFD_ALLOW_SEALING;
extern const int CVS_EFD_CLOEXEC;
extern const int CVS_EFD_NONBLOCK;
extern const int CVS_EFD_SEMAPHORE;

// Ring indices in guest memory are shared with another agent: acquire loads, release stores and a
// full fence where the virtio spec asks for one. Plain C11 atomics on raw addresses.
static inline uint16_t cvs_load_acquire_u16(const void *p) {
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}
static inline void cvs_store_release_u16(void *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}
static inline void cvs_fence_seq_cst(void) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
static inline void cvs_fence_acquire(void) {
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
}

// Dirty-page logs are shared with the VMM, which reads and clears them while the device sets bits.
static inline void cvs_atomic_or_u8(void *p, uint8_t bits) {
    __atomic_fetch_or((uint8_t *)p, bits, __ATOMIC_RELAXED);
}
static inline uint8_t cvs_atomic_exchange_u8(void *p, uint8_t value) {
    return __atomic_exchange_n((uint8_t *)p, value, __ATOMIC_RELAXED);
}

// TAP ioctls live in their own header; included here because the umbrella header defines the module.
#include "CVirtioShimTap.h"
#include "CVirtioShimSocket.h"
#include "CVirtioShimUring.h"
#include "CVirtioShimGuard.h"

#endif
