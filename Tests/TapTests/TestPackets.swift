import Foundation
import Glibc
import NetworkTestSupport
import Tap

/// TAP-specific helpers for the TAP tests: addresses, configuring the TAP as a host interface, and
/// reading and writing frames with their vnet header. Namespaces, sockets and frame builders come
/// from NetworkTestSupport. Addresses come from 198.18.0.0/15 only and are used only inside the
/// tests' own namespaces.
enum TestNet {
    static let tapMAC: [UInt8] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01]
    static let peerMAC: [UInt8] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02]
    static let tapIP: [UInt8] = [198, 18, 0, 1]
    static let peerIP: [UInt8] = [198, 18, 0, 2]
    static let tapIPString = "198.18.0.1"
    static let peerIPString = "198.18.0.2"

    /// Gives the TAP a fixed MAC and 198.18.0.1/24, a permanent neighbour 198.18.0.2, and brings it up.
    static func configure(_ namespace: NetworkNamespace, tap: String) throws {
        try namespace.ip("link", "set", tap, "address", Address.macString(tapMAC))
        try namespace.ip("address", "add", "\(tapIPString)/24", "dev", tap)
        try namespace.ip("link", "set", tap, "up")
        try namespace.ip(
            "neigh", "replace", peerIPString, "lladdr", Address.macString(peerMAC), "dev", tap, "nud", "permanent")
    }

    /// Turns IPv6 off for interfaces created afterwards in the calling thread's namespace.
    static func disableIPv6InCurrentNamespace() {
        Sysctl.disableIPv6InCurrentNamespace()
    }

    /// Runs `body` again while it fails with ``TapError/busy(device:_:)``, for up to ten seconds.
    ///
    /// A single-queue TAP whose descriptor was just closed can still be attached for a moment: a
    /// child that another test is spawning (`ip`) holds a copy of the descriptor table until its exec
    /// closes the close-on-exec descriptors. Used only where the test's own descriptor is closed.
    static func retryingWhileBusy<Result>(_ body: () throws -> Result) throws -> Result {
        let clock = ContinuousClock()
        let end = clock.now.advanced(by: .seconds(10))
        while true {
            do {
                return try body()
            } catch TapError.busy(let device, let cause) {
                if clock.now >= end { throw TapError.busy(device: device, cause) }
            }
        }
    }

    /// `TapDevice.open(name:)`, tried again while it fails with ``TapError/busy(device:_:)``, for up
    /// to ten seconds.
    ///
    /// A single-queue TAP whose descriptor this process just closed can still be attached for a
    /// moment: a child that another test is spawning (`ip`) holds a copy of the descriptor table
    /// until its exec closes the close-on-exec descriptors.
    static func openRetryingWhileBusy(name: String) throws(TapError) -> TapDevice {
        let clock = ContinuousClock()
        let end = clock.now.advanced(by: .seconds(10))
        while true {
            do {
                return try TapDevice.open(name: name)
            } catch {
                guard case .busy = error, clock.now < end else { throw error }
            }
        }
    }

    /// `TapDevice.delete(name:)`, tried again while it fails with ``TapError/busy(device:_:)`` (it
    /// attaches too; see ``openRetryingWhileBusy(name:)``).
    static func deleteRetryingWhileBusy(name: String) throws(TapError) -> Bool {
        let clock = ContinuousClock()
        let end = clock.now.advanced(by: .seconds(10))
        while true {
            do {
                return try TapDevice.delete(name: name)
            } catch {
                guard case .busy = error, clock.now < end else { throw error }
            }
        }
    }

    // MARK: Frames

    /// Twelve zero bytes: virtio_net_hdr_v1 without checksum or GSO requests.
    static let zeroVnetHeader = [UInt8](repeating: 0, count: 12)

    /// An Ethernet frame carrying an IPv4/UDP datagram (IP checksum filled, UDP checksum 0 = none).
    static func udpFrame(
        from sourceMAC: [UInt8], to destinationMAC: [UInt8],
        sourceIP: [UInt8], destinationIP: [UInt8], sourcePort: UInt16, destinationPort: UInt16,
        payload: [UInt8]
    ) -> [UInt8] {
        Packet.udpFrame(
            sourceMAC: sourceMAC, destinationMAC: destinationMAC, .v4(source: sourceIP, destination: destinationIP),
            sourcePort: sourcePort, destinationPort: destinationPort, payload: payload, checksum: .none)
    }

    /// The parsed parts of a frame read from the TAP that the tests look at.
    struct ReadFrame {
        let queue: Int
        let bytes: [UInt8]  // vnet header included

        var header: ArraySlice<UInt8> { bytes.prefix(12) }
        var ethernet: ArraySlice<UInt8> { bytes.dropFirst(12) }
        var flags: UInt8 { bytes[0] }
        var gsoType: UInt8 { bytes[1] }
        var gsoSize: UInt16 { UInt16(bytes[4]) | UInt16(bytes[5]) << 8 }

        /// The UDP destination port if this is an IPv4/UDP frame without IP options.
        var udpDestinationPort: UInt16? {
            let e = Array(ethernet)
            guard e.count >= 14 + 20 + 8, e[12] == 0x08, e[13] == 0x00, e[14] == 0x45, e[23] == 17 else { return nil }
            return UInt16(e[36]) << 8 | UInt16(e[37])
        }

        var udpSourcePort: UInt16? {
            let e = Array(ethernet)
            guard udpDestinationPort != nil else { return nil }
            return UInt16(e[34]) << 8 | UInt16(e[35])
        }
    }

    /// Reads frames from the given queues until `wanted` frames matching `predicate` arrived or the
    /// deadline passed (waiting with poll, never sleeping). Non-matching frames are dropped.
    static func readFrames(
        from tap: TapDevice, queues: [Int], wanted: Int, deadline: Duration = .seconds(10),
        prefill: UInt8 = 0xAA, matching predicate: (ReadFrame) -> Bool
    ) throws -> [ReadFrame] {
        let clock = ContinuousClock()
        let end = clock.now.advanced(by: deadline)
        var buffer = [UInt8](repeating: prefill, count: 65536 + 12)
        var found: [ReadFrame] = []
        while found.count < wanted {
            let remaining = clock.now.duration(to: end)
            guard remaining > .zero else { break }
            let ready = try Poll.waitReadable(queues.map { tap.fd(queue: $0) }, timeout: remaining)
            for (queue, isReady) in zip(queues, ready) where isReady {
                while true {
                    for index in buffer.indices { buffer[index] = prefill }
                    let count = try buffer.withUnsafeMutableBytes { raw in
                        var vector = iovec(iov_base: raw.baseAddress, iov_len: raw.count)
                        return try withUnsafePointer(to: &vector) {
                            try tap.read(queue: queue, into: UnsafeBufferPointer(start: $0, count: 1))
                        }
                    }
                    guard let count else { break }
                    let frame = ReadFrame(queue: queue, bytes: Array(buffer.prefix(count)))
                    if predicate(frame) { found.append(frame) }
                }
            }
        }
        return found
    }

    /// Writes `header + frame` to `queue` as two iovecs, as the data path does.
    @discardableResult
    static func write(_ tap: TapDevice, queue: Int, header: [UInt8] = zeroVnetHeader, frame: [UInt8]) throws -> Int? {
        try header.withUnsafeBytes { headerBytes in
            try frame.withUnsafeBytes { frameBytes in
                let vectors = [
                    iovec(iov_base: UnsafeMutableRawPointer(mutating: headerBytes.baseAddress), iov_len: headerBytes.count),
                    iovec(iov_base: UnsafeMutableRawPointer(mutating: frameBytes.baseAddress), iov_len: frameBytes.count),
                ]
                return try vectors.withUnsafeBufferPointer { try tap.write(queue: queue, iovecs: $0) }
            }
        }
    }
}
