// Makes Swift's Synchronization.Mutex visible to ThreadSanitizer on Linux (scripts/test --sanitize
// thread preloads this library into the test processes).
//
// Why: Mutex.withLock is inlined into our code, so its fast path (a compare-and-swap on the lock word,
// acquiring to lock, releasing to unlock) is instrumented and TSan sees it. When the lock is contended,
// the inlined code calls _MutexHandle._lockSlow / _unlockSlow / _tryLockSlow in
// libswiftSynchronization.so, which takes or hands over the lock with FUTEX_LOCK_PI / FUTEX_UNLOCK_PI
// and is not instrumented. TSan then sees no happens-before between the unlocking and the locking
// thread, and reports every access made under a contended Mutex as a data race (a four-thread counter
// under a Mutex, correct at 800000, is "raced" without this library and clean with it).
//
// What: these three functions stand in for the library's (the preloaded definition wins), call the
// real ones, and tell TSan what they did: acquire after a slow lock, release before a slow unlock, on
// the lock word's address, which is where the inlined fast path's atomics synchronize. Races on data
// not protected by the Mutex are still reported. Nothing else is interposed or suppressed.
//
// The functions use Swift's calling convention: `self` (the _MutexHandle, i.e. its lock word) is
// passed by address in the swiftself register (clang's swift_context), the thread id argument as usual.
// In processes without TSan (the __tsan_ functions are weak and absent) they only forward.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>

__attribute__((weak)) void __tsan_acquire(void *address);
__attribute__((weak)) void __tsan_release(void *address);

#define SWIFTCALL __attribute__((swiftcall))
#define SWIFT_SELF __attribute__((swift_context))

#define LOCK_SLOW "$s15Synchronization12_MutexHandleV9_lockSlowyys6UInt32VF"
#define TRY_LOCK_SLOW "$s15Synchronization12_MutexHandleV12_tryLockSlowSbyF"
#define UNLOCK_SLOW "$s15Synchronization12_MutexHandleV11_unlockSlowyyF"

typedef SWIFTCALL void (*LockSlow)(uint32_t, void *SWIFT_SELF);
typedef SWIFTCALL bool (*TryLockSlow)(void *SWIFT_SELF);
typedef SWIFTCALL void (*UnlockSlow)(void *SWIFT_SELF);

static void *real(void **cache, const char *name) {
    void *function = __atomic_load_n(cache, __ATOMIC_ACQUIRE);
    if (!function) {
        function = dlsym(RTLD_NEXT, name);
        __atomic_store_n(cache, function, __ATOMIC_RELEASE);
    }
    return function;
}

SWIFTCALL void lock_slow(uint32_t thread, void *SWIFT_SELF handle) __asm__(LOCK_SLOW);
SWIFTCALL void lock_slow(uint32_t thread, void *SWIFT_SELF handle) {
    static void *cache;
    ((LockSlow)real(&cache, LOCK_SLOW))(thread, handle);
    if (__tsan_acquire) __tsan_acquire(handle);
}

SWIFTCALL bool try_lock_slow(void *SWIFT_SELF handle) __asm__(TRY_LOCK_SLOW);
SWIFTCALL bool try_lock_slow(void *SWIFT_SELF handle) {
    static void *cache;
    bool locked = ((TryLockSlow)real(&cache, TRY_LOCK_SLOW))(handle);
    if (locked && __tsan_acquire) __tsan_acquire(handle);
    return locked;
}

SWIFTCALL void unlock_slow(void *SWIFT_SELF handle) __asm__(UNLOCK_SLOW);
SWIFTCALL void unlock_slow(void *SWIFT_SELF handle) {
    static void *cache;
    if (__tsan_release) __tsan_release(handle);
    ((UnlockSlow)real(&cache, UNLOCK_SLOW))(handle);
}
