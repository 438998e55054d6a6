#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim

/// A shared mapping of a file, unmapped when the last reference goes.
///
/// Holds a raw pointer, hence a class named for what it owns; the bytes themselves are shared with
/// another agent (a guest), so readers treat them as untrusted and volatile.
public final class MemoryMapping: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let length: Int
    /// The guard slot of a guarded mapping (see `init(fd:offset:length:pageSize:guarded:)`), else -1.
    private let guardSlot: Int32

    /// Maps `length` bytes of `fd` from `offset`, readable and writable, shared.
    ///
    /// A `guarded` mapping survives its file shrinking: an access past the new end (SIGBUS) finds a
    /// private zero page instead, and is counted in `faults`. `pageSize` is the size of the file's
    /// pages (a hugetlbfs file's huge page); `offset` and `length` must be multiples of it.
    public init(fd: Int32, offset: UInt64, length: Int, pageSize: Int = 4096, guarded: Bool = false) throws(SystemError) {
        guard length > 0, let fileOffset = off_t(exactly: offset) else {
            throw SystemError(call: "mmap", code: EINVAL)
        }
        if guarded {
            _ = try retryingOnInterrupt("sigaction(SIGBUS)") { cvs_guard_install() }
        }
        let pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, fileOffset)
        guard let pointer, pointer != MAP_FAILED else {
            throw SystemError(call: "mmap", code: Glibc.errno)
        }
        var slot: Int32 = -1
        if guarded {
            slot = cvs_guard_register(pointer, length, pageSize)
            if slot < 0 {
                let code = Glibc.errno
                munmap(pointer, length)
                throw SystemError(call: "guard guest memory mapping", code: code)
            }
        }
        self.base = pointer
        self.length = length
        self.guardSlot = slot
    }

    /// Accesses that faulted past the end of the file (a guarded mapping whose file shrank).
    public var faults: UInt64 { guardSlot >= 0 ? cvs_guard_faults(guardSlot) : 0 }

    /// Faults caught in every guarded mapping of the process: a cheap check that nothing happened.
    public static var faultsInProcess: UInt64 { cvs_guard_total_faults() }

    deinit {
        if guardSlot >= 0 { cvs_guard_unregister(guardSlot) }
        munmap(base, length)
    }
}
