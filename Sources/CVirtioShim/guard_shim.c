#define _GNU_SOURCE
#include "CVirtioShimGuard.h"
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>

// A slot is live while `start` is non-zero; `end` and `page` are written before `start` (release)
// and read after it (acquire), so the handler never sees a half-written slot.
struct guarded {
    _Atomic uintptr_t start;
    _Atomic uintptr_t end;
    _Atomic uintptr_t page;
    _Atomic uint64_t faults;
};

static struct guarded slots[CVS_GUARD_SLOTS];
static _Atomic int high_water;  // slots at or above this index were never used
static _Atomic uint64_t total_faults;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int installed;
static struct sigaction previous;

static void on_sigbus(int signal, siginfo_t *info, void *context) {
    uintptr_t address = (uintptr_t)info->si_addr;
    int limit = atomic_load_explicit(&high_water, memory_order_acquire);
    for (int index = 0; index < limit; index++) {
        uintptr_t start = atomic_load_explicit(&slots[index].start, memory_order_acquire);
        if (start == 0 || address < start) continue;
        if (address >= atomic_load_explicit(&slots[index].end, memory_order_relaxed)) continue;
        uintptr_t page = atomic_load_explicit(&slots[index].page, memory_order_relaxed);
        void *base = (void *)(address & ~(page - 1));
        // mmap is async-signal-safe in practice (a system call); the faulting access runs again.
        if (mmap(base, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED) break;
        atomic_fetch_add_explicit(&slots[index].faults, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&total_faults, 1, memory_order_release);
        return;
    }
    // Not guest memory (or the page could not be replaced): a real bug. Fault again, as before.
    (void)signal;
    (void)context;
    sigaction(SIGBUS, &previous, NULL);
}

int cvs_guard_install(void) {
    pthread_mutex_lock(&lock);
    int result = 0;
    if (!installed) {
        struct sigaction action;
        memset(&action, 0, sizeof(action));
        action.sa_sigaction = on_sigbus;
        action.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&action.sa_mask);
        result = sigaction(SIGBUS, &action, &previous);
        if (result == 0) installed = 1;
    }
    pthread_mutex_unlock(&lock);
    return result;
}

int cvs_guard_register(void *start, size_t length, size_t page_size) {
    if (!start || length == 0 || page_size == 0 || (page_size & (page_size - 1)) != 0) { errno = EINVAL; return -1; }
    pthread_mutex_lock(&lock);
    int found = -1;
    for (int index = 0; index < CVS_GUARD_SLOTS; index++) {
        if (atomic_load_explicit(&slots[index].start, memory_order_relaxed) == 0) { found = index; break; }
    }
    if (found >= 0) {
        atomic_store_explicit(&slots[found].end, (uintptr_t)start + length, memory_order_relaxed);
        atomic_store_explicit(&slots[found].page, page_size, memory_order_relaxed);
        atomic_store_explicit(&slots[found].faults, 0, memory_order_relaxed);
        atomic_store_explicit(&slots[found].start, (uintptr_t)start, memory_order_release);
        if (found >= atomic_load_explicit(&high_water, memory_order_relaxed)) {
            atomic_store_explicit(&high_water, found + 1, memory_order_release);
        }
    }
    pthread_mutex_unlock(&lock);
    if (found < 0) errno = ENOSPC;
    return found;
}

void cvs_guard_unregister(int slot) {
    if (slot < 0 || slot >= CVS_GUARD_SLOTS) return;
    pthread_mutex_lock(&lock);
    atomic_store_explicit(&slots[slot].start, 0, memory_order_release);
    pthread_mutex_unlock(&lock);
}

uint64_t cvs_guard_faults(int slot) {
    if (slot < 0 || slot >= CVS_GUARD_SLOTS) return 0;
    return atomic_load_explicit(&slots[slot].faults, memory_order_relaxed);
}

uint64_t cvs_guard_total_faults(void) { return atomic_load_explicit(&total_faults, memory_order_acquire); }
