#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim

/// A unix stream socket that can pass file descriptors (SCM_RIGHTS), as vhost-user needs.
public final class UnixSocket: Sendable {
    private let descriptor: OwnedFileDescriptor
    public var rawValue: Int32 { descriptor.rawValue }

    private init(_ descriptor: consuming OwnedFileDescriptor) {
        self.descriptor = descriptor
    }

    /// Listens on `path`, which must not exist.
    public static func listen(path: String, backlog: Int32 = 4) throws(SystemError) -> UnixSocket {
        let fd = try retryingOnInterrupt("bind(\(path))") { cvs_unix_listen(path, backlog) }
        return UnixSocket(OwnedFileDescriptor(taking: fd))
    }

    /// Connects to the socket at `path`.
    public static func connect(path: String) throws(SystemError) -> UnixSocket {
        let fd = try retryingOnInterrupt("connect(\(path))") { cvs_unix_connect(path) }
        return UnixSocket(OwnedFileDescriptor(taking: fd))
    }

    /// A connected pair (for tests).
    public static func pair() throws(SystemError) -> (UnixSocket, UnixSocket) {
        var fds: [Int32] = [0, 0]
        _ = try retryingOnInterrupt("socketpair") { socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) }
        return (UnixSocket(OwnedFileDescriptor(taking: fds[0])), UnixSocket(OwnedFileDescriptor(taking: fds[1])))
    }

    public func accept() throws(SystemError) -> UnixSocket {
        let fd = try retryingOnInterrupt("accept4") { cvs_accept_cloexec(descriptor.rawValue) }
        return UnixSocket(OwnedFileDescriptor(taking: fd))
    }

    /// On a non-blocking listener: the next pending connection, nil when there is none.
    public func acceptPending() throws(SystemError) -> UnixSocket? {
        guard let fd = try retryingOnInterruptUnlessWouldBlock("accept4", { cvs_accept_cloexec(descriptor.rawValue) }) else { return nil }
        return UnixSocket(OwnedFileDescriptor(taking: fd))
    }

    /// Reads and writes that would block fail with EAGAIN instead (the `...Available` calls).
    public func setNonBlocking(_ enabled: Bool = true) throws(SystemError) {
        try descriptor.setNonBlocking(enabled)
    }

    /// Receives up to `buffer.count` bytes and any descriptors sent with them. 0 bytes: the peer closed.
    /// `truncated` is true when descriptors or data were cut off (the ones that arrived are still returned).
    public func receive(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> (count: Int, fds: [ReceivedFD], truncated: Bool) {
        var raw = [Int32](repeating: -1, count: Int(CVS_MAX_FDS_PER_MESSAGE))
        var fdCount: Int32 = 0
        var truncated: Int32 = 0
        let count = try retryingOnInterrupt("recvmsg") {
            cvs_recv_with_fds(descriptor.rawValue, buffer.baseAddress, buffer.count, &raw, CVS_MAX_FDS_PER_MESSAGE, &fdCount, &truncated)
        }
        let fds = raw.prefix(Int(fdCount)).map { ReceivedFD(OwnedFileDescriptor(taking: $0)) }
        return (count, fds, truncated != 0)
    }

    /// On a non-blocking socket: like `receive(into:)`, or nil when nothing is waiting.
    public func receiveAvailable(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> (count: Int, fds: [ReceivedFD], truncated: Bool)? {
        var raw = [Int32](repeating: -1, count: Int(CVS_MAX_FDS_PER_MESSAGE))
        var fdCount: Int32 = 0
        var truncated: Int32 = 0
        let result = try retryingOnInterruptUnlessWouldBlock("recvmsg") {
            cvs_recv_with_fds(descriptor.rawValue, buffer.baseAddress, buffer.count, &raw, CVS_MAX_FDS_PER_MESSAGE, &fdCount, &truncated)
        }
        guard let count = result else { return nil }
        let fds = raw.prefix(Int(fdCount)).map { ReceivedFD(OwnedFileDescriptor(taking: $0)) }
        return (count, fds, truncated != 0)
    }

    /// On a non-blocking socket: reads up to `buffer.count` bytes (descriptors sent with them are
    /// dropped by the kernel); 0 when the peer closed, nil when nothing is waiting.
    public func readAvailable(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Int? {
        try retryingOnInterruptUnlessWouldBlock("read") { Glibc.read(descriptor.rawValue, buffer.baseAddress, buffer.count) }
    }

    /// On a non-blocking socket: sends what fits of `bytes` (with `fds` on the first byte); returns
    /// how much, or nil when nothing fits now.
    public func sendAvailable(_ bytes: UnsafeRawBufferPointer, fds: [Int32] = []) throws(SystemError) -> Int? {
        try retryingOnInterruptUnlessWouldBlock("sendmsg") {
            cvs_send_with_fds(descriptor.rawValue, bytes.baseAddress, bytes.count, fds, Int32(fds.count))
        }
    }

    /// Reads exactly `buffer.count` bytes (no descriptors expected); false if the peer closed first.
    public func receiveExactly(into buffer: UnsafeMutableRawBufferPointer) throws(SystemError) -> Bool {
        var offset = 0
        while offset < buffer.count {
            let count = try retryingOnInterrupt("read") { Glibc.read(descriptor.rawValue, buffer.baseAddress! + offset, buffer.count - offset) }
            if count == 0 { return false }
            offset += count
        }
        return true
    }

    /// Sends all of `bytes`, with `fds` attached to the first part.
    public func send(_ bytes: UnsafeRawBufferPointer, fds: [Int32] = []) throws(SystemError) {
        var offset = 0
        var attached = fds
        while offset < bytes.count {
            let count = try retryingOnInterrupt("sendmsg") {
                cvs_send_with_fds(descriptor.rawValue, bytes.baseAddress! + offset, bytes.count - offset, attached, Int32(attached.count))
            }
            offset += count
            attached = []
        }
    }

    public func send(_ bytes: [UInt8], fds: [Int32] = []) throws(SystemError) {
        var failure: SystemError?
        bytes.withUnsafeBytes { buffer in
            do throws(SystemError) { try send(buffer, fds: fds) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Stops both directions: a thread blocked reading this socket wakes up with end-of-file.
    public func shutdown() {
        _ = Glibc.shutdown(descriptor.rawValue, Int32(SHUT_RDWR))
    }
}

/// A descriptor received from a peer: owned here, closed unless taken.
public final class ReceivedFD: @unchecked Sendable {
    private var descriptor: OwnedFileDescriptor?
    public let rawValue: Int32

    init(_ descriptor: consuming OwnedFileDescriptor) {
        rawValue = descriptor.rawValue
        self.descriptor = .some(descriptor)
    }

    /// Takes ownership; nil if it was taken already.
    public func take() -> OwnedFileDescriptor? {
        let taken = descriptor.take()
        return taken
    }
}

/// Waits until one of `fds` is readable or `timeoutMilliseconds` pass (-1: forever); returns which.
public func waitReadable(_ fds: [Int32], timeoutMilliseconds: Int32) throws(SystemError) -> [Bool] {
    var entries = fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
    let count = Glibc.poll(&entries, nfds_t(entries.count), timeoutMilliseconds)
    if count < 0 {
        let code = Glibc.errno
        if code == EINTR { return fds.map { _ in false } }
        throw SystemError(call: "poll", code: code)
    }
    return entries.map { $0.revents != 0 }
}
