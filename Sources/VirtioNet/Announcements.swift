#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import Sys

/// Frames the device announces itself with (a RARP after a migration), waiting for the one thread
/// that owns queue pair 0 to send them: only a queue's owner touches the backend's queue.
final class Announcements: Sendable {
    private let pending = Mutex<[[UInt8]]>([])
    /// Readable while frames wait; the owning worker watches it.
    let signal: EventFD

    init() throws(SystemError) { signal = try EventFD() }

    func post(_ frame: [UInt8]) {
        pending.withLock { $0.append(frame) }
        try? signal.signal()
    }

    /// Sends the waiting frames in order on `queue`; those the backend cannot take now stay, first.
    /// Returns false if the backend would block.
    @discardableResult
    func send(through backend: some PacketBackend, queue: Int) -> Bool {
        _ = try? signal.drain()
        return pending.withLock { frames in
            while let frame = frames.first {
                let outcome = frame.withUnsafeBytes { bytes in
                    var vector = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count)
                    return withUnsafePointer(to: &vector) { backend.transmit(queue: queue, frame: UnsafeBufferPointer(start: $0, count: 1)) }
                }
                if outcome == .wouldBlock { return false }
                frames.removeFirst()
            }
            return true
        }
    }

    /// A RARP request for `mac` with a zero vnet header, as QEMU's self-announce sends, so that
    /// switches learn where the guest is now.
    static func reverseARP(for mac: MACAddress) -> [UInt8] {
        var frame = MACAddress.broadcast.array + mac.array + [0x80, 0x35]  // RARP
        frame += [0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]  // Ethernet, IPv4, request reverse
        frame += mac.array + [0, 0, 0, 0] + mac.array + [0, 0, 0, 0]
        frame += [UInt8](repeating: 0, count: 60 - frame.count)
        return VirtioNetHeader().bytes + frame
    }
}
