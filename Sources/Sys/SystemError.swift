#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// A failed system call: which call, and the errno it left.
public struct SystemError: Error, CustomStringConvertible, Equatable, Sendable {
    public let call: String
    public let errno: Errno

    public init(call: String, errno: Errno) {
        self.call = call
        self.errno = errno
    }

    public init(call: String, code: Int32) {
        self.init(call: call, errno: Errno(rawValue: code))
    }

    public var description: String { "\(call): \(errno) (errno \(errno.rawValue))" }
}

/// Runs a syscall that reports failure as -1 and errno, retrying on EINTR.
@inlinable
public func retryingOnInterrupt<Result: FixedWidthInteger>(
    _ call: String, _ body: () -> Result
) throws(SystemError) -> Result {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        throw SystemError(call: call, code: code)
    }
}

/// Like `retryingOnInterrupt`, but EAGAIN/EWOULDBLOCK come back as nil instead of an error: the
/// non-blocking data path treats "would block" as an ordinary outcome.
@inlinable
public func retryingOnInterruptUnlessWouldBlock<Result: FixedWidthInteger>(
    _ call: String, _ body: () -> Result
) throws(SystemError) -> Result? {
    while true {
        let result = body()
        if result != -1 { return result }
        let code = Glibc.errno
        if code == EINTR { continue }
        if code == EAGAIN || code == EWOULDBLOCK { return nil }
        throw SystemError(call: call, code: code)
    }
}
