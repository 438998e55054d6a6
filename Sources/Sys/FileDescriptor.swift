#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim

/// An open file descriptor that this value owns: it is closed exactly once, when the value ends.
public struct OwnedFileDescriptor: ~Copyable, @unchecked Sendable {
    public let rawValue: Int32

    /// Takes ownership of `rawValue`, which must be an open descriptor nobody else closes.
    public init(taking rawValue: Int32) {
        self.rawValue = rawValue
    }

    /// Gives up ownership without closing; the caller now owns the descriptor.
    public consuming func release() -> Int32 {
        let fd = rawValue
        discard self
        return fd
    }

    /// A second, independent descriptor for the same open file (close-on-exec).
    public func duplicate() throws(SystemError) -> OwnedFileDescriptor {
        let fd = try retryingOnInterrupt("fcntl(F_DUPFD_CLOEXEC)") { fcntl(rawValue, F_DUPFD_CLOEXEC, 0) }
        return OwnedFileDescriptor(taking: fd)
    }

    public func setNonBlocking(_ enabled: Bool) throws(SystemError) {
        let flags = try retryingOnInterrupt("fcntl(F_GETFL)") { fcntl(rawValue, F_GETFL) }
        let wanted = enabled ? flags | O_NONBLOCK : flags & ~O_NONBLOCK
        if wanted != flags {
            _ = try retryingOnInterrupt("fcntl(F_SETFL)") { fcntl(rawValue, F_SETFL, wanted) }
        }
    }

    deinit {
        // close() must not be retried on EINTR on Linux: the descriptor is gone either way.
        _ = Glibc.close(rawValue)
    }
}

/// A memfd: anonymous shared memory with a file descriptor, as VMMs use for guest RAM.
public enum MemFD {
    public static func create(name: String, size: Int) throws(SystemError) -> OwnedFileDescriptor {
        let fd = try retryingOnInterrupt("memfd_create") { cvs_memfd_create(name, CVS_MFD_CLOEXEC) }
        let owned = OwnedFileDescriptor(taking: fd)
        _ = try retryingOnInterrupt("ftruncate") { ftruncate(owned.rawValue, off_t(size)) }
        return owned
    }
}
