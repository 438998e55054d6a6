#if canImport(Glibc)
import Glibc
#endif

/// A shared mapping of a file, unmapped when the last reference goes.
///
/// Holds a raw pointer, hence a class named for what it owns; the bytes themselves are shared with
/// another agent (a guest), so readers treat them as untrusted and volatile.
public final class MemoryMapping: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let length: Int

    /// Maps `length` bytes of `fd` from `offset`, readable and writable, shared.
    public init(fd: Int32, offset: UInt64, length: Int) throws(SystemError) {
        guard length > 0, let fileOffset = off_t(exactly: offset) else {
            throw SystemError(call: "mmap", code: EINVAL)
        }
        let pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, fileOffset)
        guard let pointer, pointer != MAP_FAILED else {
            throw SystemError(call: "mmap", code: Glibc.errno)
        }
        self.base = pointer
        self.length = length
    }

    deinit {
        munmap(base, length)
    }
}
