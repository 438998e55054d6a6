#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Sys

/// Says when the links of a network namespace change: a netlink socket subscribed to the kernel's
/// link notifications (RTMGRP_LINK), opened in the namespace of the calling thread. It does not
/// parse them: whoever wakes on ``fd`` drains it and looks at what it cares about (a TAP's
/// ``TapDevice/isGone``, say). A TAP descriptor alone cannot tell a poller that its interface was
/// deleted: it reports POLLERR, but the kernel's wake-up then carries only "readable".
public final class LinkMonitor: Sendable {
    private let socket: OwnedFileDescriptor

    public init() throws(SystemError) {
        socket = OwnedFileDescriptor(taking: try retryingOnInterrupt("socket(AF_NETLINK)") { cvs_link_monitor_open() })
    }

    /// Readable while notifications wait; for poll or epoll.
    public var fd: Int32 { socket.rawValue }

    /// Reads and discards every waiting notification. True if there was any, or if the kernel dropped
    /// some because they were not read in time (ENOBUFS): something changed either way.
    @discardableResult
    public func drain() -> Bool {
        var buffer = [UInt8](repeating: 0, count: 16384)
        var changed = false
        while true {
            let count = buffer.withUnsafeMutableBytes { recv(socket.rawValue, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if count > 0 { changed = true; continue }
            if count == 0 { return changed }
            switch errno {
            case EINTR: continue
            case ENOBUFS: changed = true; continue
            default: return changed  // EAGAIN: nothing more now
            }
        }
    }
}
