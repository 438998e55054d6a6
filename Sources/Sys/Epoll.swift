#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim

/// An epoll instance; events carry a caller-chosen 64-bit token.
public final class Epoll: Sendable {
    private let descriptor: OwnedFileDescriptor

    public struct Events: OptionSet, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        public static let readable = Events(rawValue: EPOLLIN.rawValue)
        public static let writable = Events(rawValue: EPOLLOUT.rawValue)
        public static let error = Events(rawValue: EPOLLERR.rawValue)
        public static let hangUp = Events(rawValue: EPOLLHUP.rawValue)
        public static let edgeTriggered = Events(rawValue: EPOLLET.rawValue)
    }

    public init() throws(SystemError) {
        let fd = try retryingOnInterrupt("epoll_create1") { epoll_create1(Int32(EPOLL_CLOEXEC)) }
        descriptor = OwnedFileDescriptor(taking: fd)
    }

    public func add(fd: Int32, events: Events, token: UInt64) throws(SystemError) {
        try control(EPOLL_CTL_ADD, "epoll_ctl(ADD)", fd: fd, events: events, token: token)
    }

    public func modify(fd: Int32, events: Events, token: UInt64) throws(SystemError) {
        try control(EPOLL_CTL_MOD, "epoll_ctl(MOD)", fd: fd, events: events, token: token)
    }

    public func remove(fd: Int32) throws(SystemError) {
        try control(EPOLL_CTL_DEL, "epoll_ctl(DEL)", fd: fd, events: [], token: 0)
    }

    private func control(_ op: Int32, _ name: String, fd: Int32, events: Events, token: UInt64) throws(SystemError) {
        var event = epoll_event()
        event.events = events.rawValue
        event.data.u64 = token
        _ = try retryingOnInterrupt(name) { epoll_ctl(descriptor.rawValue, op, fd, &event) }
    }

    /// Waits up to `timeoutMilliseconds` (-1: forever) and fills `events`; returns how many are ready.
    /// An interrupted wait returns 0 rather than retrying with the full timeout.
    public func wait(into events: UnsafeMutableBufferPointer<epoll_event>, timeoutMilliseconds: Int32) throws(SystemError) -> Int {
        let count = epoll_wait(descriptor.rawValue, events.baseAddress, Int32(events.count), timeoutMilliseconds)
        if count >= 0 { return Int(count) }
        let code = Glibc.errno
        if code == EINTR { return 0 }
        throw SystemError(call: "epoll_wait", code: code)
    }
}
