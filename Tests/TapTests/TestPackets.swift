import Foundation
import Glibc
import Tap

/// Frames, sockets and waiting helpers for the TAP tests. Addresses come from 198.18.0.0/15 only and
/// are used only inside the tests' own namespaces.
enum TestNet {
    static let tapMAC: [UInt8] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01]
    static let peerMAC: [UInt8] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02]
    static let tapIP: [UInt8] = [198, 18, 0, 1]
    static let peerIP: [UInt8] = [198, 18, 0, 2]
    static let tapIPString = "198.18.0.1"
    static let peerIPString = "198.18.0.2"
    static func macString(_ mac: [UInt8]) -> String {
        mac.map { String(format: "%02x", $0) }.joined(separator: ":")
    }

    /// Gives the TAP a fixed MAC and 198.18.0.1/24, a permanent neighbour 198.18.0.2, and brings it up.
    static func configure(_ namespace: NetworkNamespace, tap: String) throws {
        try namespace.ip("link", "set", tap, "address", macString(tapMAC))
        try namespace.ip("address", "add", "\(tapIPString)/24", "dev", tap)
        try namespace.ip("link", "set", tap, "up")
        try namespace.ip(
            "neigh", "replace", peerIPString, "lladdr", macString(peerMAC), "dev", tap, "nud", "permanent")
    }

    /// Turns IPv6 off for interfaces created afterwards in the calling thread's namespace, so the
    /// kernel sends no router solicitations or MLD reports into the TAPs. Best effort: the tests filter
    /// frames by content anyway.
    static func disableIPv6InCurrentNamespace() {
        for path in ["/proc/sys/net/ipv6/conf/default/disable_ipv6", "/proc/sys/net/ipv6/conf/all/disable_ipv6"] {
            let fd = open(path, O_WRONLY | O_CLOEXEC)
            if fd >= 0 {
                _ = Glibc.write(fd, "1", 1)
                close(fd)
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
        var frame = destinationMAC + sourceMAC + [0x08, 0x00]
        let totalLength = UInt16(20 + 8 + payload.count)
        var ip: [UInt8] = [0x45, 0x00] + bigEndian(totalLength) + [0x00, 0x01, 0x40, 0x00, 64, 17, 0, 0]
        ip += sourceIP + destinationIP
        let checksum = internetChecksum(ip)
        ip[10] = UInt8(checksum >> 8)
        ip[11] = UInt8(checksum & 0xff)
        frame += ip
        frame += bigEndian(sourcePort) + bigEndian(destinationPort) + bigEndian(UInt16(8 + payload.count)) + [0, 0]
        frame += payload
        return frame
    }

    static func bigEndian(_ value: UInt16) -> [UInt8] { [UInt8(value >> 8), UInt8(value & 0xff)] }

    static func internetChecksum(_ bytes: [UInt8]) -> UInt16 {
        var sum: UInt32 = 0
        var index = 0
        while index + 1 < bytes.count {
            sum += UInt32(bytes[index]) << 8 | UInt32(bytes[index + 1])
            index += 2
        }
        if index < bytes.count { sum += UInt32(bytes[index]) << 8 }
        while sum > 0xffff { sum = (sum & 0xffff) + (sum >> 16) }
        return ~UInt16(sum)
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
            let ready = try waitReadable(queues.map { tap.fd(queue: $0) }, timeout: remaining)
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

    /// poll(2) for readability; one flag per descriptor.
    static func waitReadable(_ fds: [Int32], timeout: Duration) throws -> [Bool] {
        var pollfds = fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
        let milliseconds = Int32(clamping: timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
        let result = poll(&pollfds, nfds_t(pollfds.count), max(milliseconds, 1))
        if result < 0 {
            if errno == EINTR { return fds.map { _ in false } }
            throw SocketError.call("poll", errno)
        }
        return pollfds.map { $0.revents & Int16(POLLIN) != 0 }
    }
}

enum SocketError: Error, CustomStringConvertible {
    case call(String, Int32)
    var description: String {
        switch self {
        case .call(let name, let code): "\(name): \(String(cString: strerror(code)))"
        }
    }
}

/// A socket owned by a test, closed in deinit. Must be created on a thread inside the test namespace.
final class TestSocket: @unchecked Sendable {
    let fd: Int32

    private init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    private static let afPacket: Int32 = 17  // AF_PACKET; linux/if_packet.h is not imported
    private static let ethPAll: UInt16 = 0x0003  // ETH_P_ALL

    /// An AF_PACKET raw socket bound to `interface`: sees every frame the interface sends or
    /// receives, and can send raw Ethernet frames out of it.
    static func packet(interface: String) throws -> TestSocket {
        let index = if_nametoindex(interface)
        guard index != 0 else { throw SocketError.call("if_nametoindex(\(interface))", errno) }
        let type = Int32(bitPattern: SOCK_RAW.rawValue | SOCK_CLOEXEC.rawValue)
        let fd = socket(afPacket, type, Int32(ethPAll.bigEndian))
        guard fd >= 0 else { throw SocketError.call("socket(AF_PACKET)", errno) }
        let socket = TestSocket(fd: fd)
        // struct sockaddr_ll, laid out by hand: family u16, protocol be16, ifindex i32, hatype u16,
        // pkttype u8, halen u8, addr[8].
        var address = [UInt8](repeating: 0, count: 20)
        withUnsafeBytes(of: UInt16(afPacket)) { address.replaceSubrange(0..<2, with: $0) }
        withUnsafeBytes(of: ethPAll.bigEndian) { address.replaceSubrange(2..<4, with: $0) }
        withUnsafeBytes(of: Int32(index)) { address.replaceSubrange(4..<8, with: $0) }
        let result = address.withUnsafeBytes {
            bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
        }
        guard result == 0 else { throw SocketError.call("bind(AF_PACKET)", errno) }
        return socket
    }

    /// A UDP socket, bound to `address:port` if given.
    static func udp(bindTo address: [UInt8]? = nil, port: UInt16 = 0) throws -> TestSocket {
        let type = Int32(bitPattern: SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue)
        let fd = socket(AF_INET, type, 0)
        guard fd >= 0 else { throw SocketError.call("socket(AF_INET)", errno) }
        let socket = TestSocket(fd: fd)
        if let address {
            var sockaddr = makeAddress(address, port: port)
            let result = withUnsafePointer(to: &sockaddr) {
                $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) {
                    bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            guard result == 0 else { throw SocketError.call("bind(AF_INET)", errno) }
        }
        return socket
    }

    static func makeAddress(_ address: [UInt8], port: UInt16) -> sockaddr_in {
        var sockaddr = sockaddr_in()
        sockaddr.sin_family = sa_family_t(AF_INET)
        sockaddr.sin_port = port.bigEndian
        sockaddr.sin_addr.s_addr = UInt32(address[0]) | UInt32(address[1]) << 8 | UInt32(address[2]) << 16 | UInt32(address[3]) << 24
        return sockaddr
    }

    func send(_ bytes: [UInt8], to address: [UInt8], port: UInt16) throws {
        var sockaddr = Self.makeAddress(address, port: port)
        let sent = bytes.withUnsafeBytes { buffer in
            withUnsafePointer(to: &sockaddr) {
                $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) {
                    sendto(fd, buffer.baseAddress, buffer.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        }
        guard sent == bytes.count else { throw SocketError.call("sendto", errno) }
    }

    /// Sends a raw frame on a packet socket.
    func sendFrame(_ frame: [UInt8]) throws {
        let sent = frame.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, 0) }
        guard sent == frame.count else { throw SocketError.call("send(AF_PACKET)", errno) }
    }

    func setOption(level: Int32, name: Int32, value: Int32) throws {
        var value = value
        guard setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
            throw SocketError.call("setsockopt(\(level), \(name))", errno)
        }
    }

    /// Receives datagrams until one satisfies `predicate` or the deadline passes.
    func receive(deadline: Duration = .seconds(10), matching predicate: ([UInt8]) -> Bool) throws -> [UInt8]? {
        let clock = ContinuousClock()
        let end = clock.now.advanced(by: deadline)
        var buffer = [UInt8](repeating: 0, count: 65536)
        while clock.now < end {
            guard try TestNet.waitReadable([fd], timeout: clock.now.duration(to: end))[0] else { continue }
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if count < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                throw SocketError.call("recv", errno)
            }
            let datagram = Array(buffer.prefix(count))
            if predicate(datagram) { return datagram }
        }
        return nil
    }
}
