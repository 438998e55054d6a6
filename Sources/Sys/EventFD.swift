#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim

/// An eventfd used as a doorbell: kicks from the driver, interrupts to it, and stop requests.
public final class EventFD: Sendable {
    private let descriptor: OwnedFileDescriptor
    public var rawValue: Int32 { descriptor.rawValue }

    /// A new non-blocking, close-on-exec eventfd; with `semaphore`, each read takes one from the counter.
    public init(semaphore: Bool = false) throws(SystemError) {
        let flags = CVS_EFD_CLOEXEC | CVS_EFD_NONBLOCK | (semaphore ? CVS_EFD_SEMAPHORE : 0)
        let fd = try retryingOnInterrupt("eventfd") { cvs_eventfd(0, flags) }
        descriptor = OwnedFileDescriptor(taking: fd)
    }

    /// Adopts an eventfd handed over by someone else (a VMM, a vhost-user peer).
    public init(adopting fd: consuming OwnedFileDescriptor) {
        descriptor = fd
    }

    /// Adopts a descriptor from an untrusted peer: it must be an eventfd, and it is made non-blocking
    /// so that a counter the peer filled up can never block a worker in write(2) or read(2).
    public init(adoptingUntrusted fd: consuming OwnedFileDescriptor) throws(SystemError) {
        var target = [UInt8](repeating: 0, count: 64)
        let length = target.withUnsafeMutableBufferPointer { buffer in
            buffer.withMemoryRebound(to: CChar.self) { readlink("/proc/self/fd/\(fd.rawValue)", $0.baseAddress!, $0.count) }
        }
        guard length > 0, String(decoding: target[0..<length], as: UTF8.self) == "anon_inode:[eventfd]" else {
            throw SystemError(call: "adopt eventfd: the descriptor is not an eventfd", code: EINVAL)
        }
        // A semaphore eventfd gives back one unit per read, so a huge count would keep it readable.
        if Self.isSemaphore(fd.rawValue) {
            throw SystemError(call: "adopt eventfd: the eventfd is in semaphore mode", code: EINVAL)
        }
        try fd.setNonBlocking(true)
        descriptor = fd
    }

    /// Whether /proc says `fd` is an eventfd in semaphore mode (kernels since 6.3 show it).
    static func isSemaphore(_ fd: Int32) -> Bool {
        let file = fopen("/proc/self/fdinfo/\(fd)", "re")
        guard let file else { return false }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), file) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            if text.hasPrefix("eventfd-semaphore:") { return text.dropFirst("eventfd-semaphore:".count).contains("1") }
        }
        return false
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
