#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim

/// An eventfd used as a doorbell: kicks from the driver, interrupts to it, and stop requests.
public final class EventFD: Sendable {
    private let descriptor: OwnedFileDescriptor
    public var rawValue: Int32 { descriptor.rawValue }

    /// A new non-blocking, close-on-exec eventfd.
    public init() throws(SystemError) {
        let fd = try retryingOnInterrupt("eventfd") { cvs_eventfd(0, CVS_EFD_CLOEXEC | CVS_EFD_NONBLOCK) }
        descriptor = OwnedFileDescriptor(taking: fd)
    }

    /// Adopts an eventfd handed over by someone else (a VMM, a vhost-user peer).
    public init(adopting fd: consuming OwnedFileDescriptor) {
        descriptor = fd
    }

    /// Adds one to the counter, waking a waiter. A full counter already wakes it, so EAGAIN is fine.
    public func signal() throws(SystemError) {
        var one: UInt64 = 1
        _ = try retryingOnInterruptUnlessWouldBlock("write(eventfd)") {
            withUnsafeBytes(of: &one) { Glibc.write(descriptor.rawValue, $0.baseAddress, 8) }
        }
    }

    /// Reads and clears the counter; nil when it was zero. Works on blocking fds only when signalled.
    @discardableResult
    public func drain() throws(SystemError) -> UInt64? {
        var value: UInt64 = 0
        let result = try retryingOnInterruptUnlessWouldBlock("read(eventfd)") {
            withUnsafeMutableBytes(of: &value) { Glibc.read(descriptor.rawValue, $0.baseAddress, 8) }
        }
        return result == nil ? nil : value
    }
}
