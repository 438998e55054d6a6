#if canImport(Glibc)
import Glibc
#endif

/// What poll(2) waits for on a descriptor, and what it reports.
public struct PollEvents: OptionSet, Sendable {
    public let rawValue: Int16
    public init(rawValue: Int16) { self.rawValue = rawValue }
    public static let readable = PollEvents(rawValue: Int16(POLLIN))
    public static let writable = PollEvents(rawValue: Int16(POLLOUT))
    /// Reported only: an error, the peer hung up, the descriptor is not open.
    public static let error = PollEvents(rawValue: Int16(POLLERR))
    public static let hangUp = PollEvents(rawValue: Int16(POLLHUP))
    public static let invalid = PollEvents(rawValue: Int16(POLLNVAL))
}

/// Waits until one of `descriptors` has one of its events (errors and hang-ups always count), or
/// `timeoutMilliseconds` pass (-1: forever). Returns what each descriptor reported, in order; all
/// empty on a timeout or when a signal interrupted the wait (the caller recomputes its timeout).
public func waitReady(_ descriptors: [(fd: Int32, events: PollEvents)], timeoutMilliseconds: Int32) throws(SystemError) -> [PollEvents] {
    var entries = descriptors.map { pollfd(fd: $0.fd, events: $0.events.rawValue, revents: 0) }
    let count = Glibc.poll(&entries, nfds_t(entries.count), timeoutMilliseconds)
    if count < 0 {
        let code = Glibc.errno
        if code == EINTR { return descriptors.map { _ in [] } }
        throw SystemError(call: "poll", code: code)
    }
    return entries.map { PollEvents(rawValue: $0.revents) }
}

/// The poll(2) timeout that ends at `deadline`: -1 for none, 0 once it has passed, else the time
/// left in milliseconds, rounded up (a wait never ends just before its deadline) and capped.
public func pollTimeout(until deadline: ContinuousClock.Instant?, now: ContinuousClock.Instant = .now) -> Int32 {
    guard let deadline else { return -1 }
    guard now < deadline else { return 0 }
    let (seconds, attoseconds) = now.duration(to: deadline).components
    let cap = Int64(Int32.max) / 1000 - 1
    guard seconds < cap else { return Int32.max }
    let milliseconds = seconds * 1000 + (attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000
    return Int32(clamping: milliseconds)
}

/// The earlier of two optional deadlines (nil: none).
public func earliest(_ a: ContinuousClock.Instant?, _ b: ContinuousClock.Instant?) -> ContinuousClock.Instant? {
    switch (a, b) {
    case let (a?, b?): min(a, b)
    case let (a?, nil): a
    case let (nil, b): b
    }
}
