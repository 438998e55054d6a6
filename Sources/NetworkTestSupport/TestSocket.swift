import Foundation
import Glibc

public enum SocketError: Error, CustomStringConvertible {
    case call(String, Int32)
    case badAddress(String)

    public var description: String {
        switch self {
        case .call(let name, let code): "\(name): \(String(cString: strerror(code)))"
        case .badAddress(let text): "not an IP address: \(text)"
        }
    }
}

/// poll(2) for readability without sleeping.
public enum Poll {
    /// Waits until one of `fds` is readable or `timeout` passes; one flag per descriptor.
    public static func waitReadable(_ fds: [Int32], timeout: Duration) throws -> [Bool] {
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

/// A socket owned by a test, closed in deinit. Create it on a thread inside the test namespace
/// (``NetworkNamespace/run(_:)``); it stays in that namespace wherever it is used afterwards.
public final class TestSocket: @unchecked Sendable {
    public let fd: Int32

    private init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    private static let afPacket: Int32 = 17  // AF_PACKET; linux/if_packet.h is not imported
    private static let ethPAll: UInt16 = 0x0003  // ETH_P_ALL

    /// What a packet socket says about a frame's direction (sll_pkttype).
    public enum PacketType: UInt8, Sendable {
        case host = 0, broadcast = 1, multicast = 2, otherHost = 3, outgoing = 4
    }

    // MARK: Making sockets

    /// An AF_PACKET raw socket bound to `interface`: sees every frame the interface sends or
    /// receives, and can send raw Ethernet frames out of it. The receive buffer is raised to 8 MiB
    /// so that bursts (a TSO frame cut into segments) are not lost before the test reads them.
    public static func packet(interface: String) throws -> TestSocket {
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
            Glibc.bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
        }
        guard result == 0 else { throw SocketError.call("bind(AF_PACKET)", errno) }
        try? socket.setOption(level: SOL_SOCKET, name: SO_RCVBUFFORCE, value: 8 << 20)
        return socket
    }

    /// A UDP socket, bound to `address:port` if given (4 bytes for IPv4).
    public static func udp(bindTo address: [UInt8]? = nil, port: UInt16 = 0) throws -> TestSocket {
        try datagram(family: AF_INET, bindTo: address.map { ($0, port) })
    }

    /// An IPv6 UDP socket, bound to `address:port` if given (16 bytes).
    public static func udp6(bindTo address: [UInt8]? = nil, port: UInt16 = 0) throws -> TestSocket {
        try datagram(family: AF_INET6, bindTo: address.map { ($0, port) })
    }

    private static func datagram(family: Int32, bindTo: ([UInt8], UInt16)?) throws -> TestSocket {
        let type = Int32(bitPattern: SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue)
        let fd = socket(family, type, 0)
        guard fd >= 0 else { throw SocketError.call("socket(\(family == AF_INET ? "AF_INET" : "AF_INET6"))", errno) }
        let socket = TestSocket(fd: fd)
        if let (address, port) = bindTo {
            let result = withSocketAddress(address, port: port) { Glibc.bind(fd, $0, $1) }
            guard result == 0 else { throw SocketError.call("bind", errno) }
        }
        return socket
    }

    /// Calls `body` with a sockaddr_in (4-byte address) or sockaddr_in6 (16 bytes) and its length.
    public static func withSocketAddress<R>(_ address: [UInt8], port: UInt16,
                                            _ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) rethrows -> R {
        if address.count == 16 {
            var storage = sockaddr_in6()
            storage.sin6_family = sa_family_t(AF_INET6)
            storage.sin6_port = port.bigEndian
            withUnsafeMutableBytes(of: &storage.sin6_addr) { $0.copyBytes(from: address) }
            return try withUnsafePointer(to: &storage) {
                try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try body($0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
            }
        }
        var storage = sockaddr_in()
        storage.sin_family = sa_family_t(AF_INET)
        storage.sin_port = port.bigEndian
        withUnsafeMutableBytes(of: &storage.sin_addr) { $0.copyBytes(from: address.prefix(4)) }
        return try withUnsafePointer(to: &storage) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { try body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
    }

    // MARK: Options and addresses

    public func setOption(level: Int32, name: Int32, value: Int32) throws {
        var value = value
        guard setsockopt(fd, level, name, &value, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
            throw SocketError.call("setsockopt(\(level), \(name))", errno)
        }
    }

    /// Binds to `address:port` (after creation, e.g. to pick a source port).
    public func bind(to address: [UInt8], port: UInt16) throws {
        let result = Self.withSocketAddress(address, port: port) { Glibc.bind(fd, $0, $1) }
        guard result == 0 else { throw SocketError.call("bind", errno) }
    }

    /// The local port the socket is bound to.
    public var localPort: UInt16 {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        // sin_port and sin6_port are both at offset 2, in network order.
        return withUnsafeBytes(of: &storage) { UInt16($0[2]) << 8 | UInt16($0[3]) }
    }

    // MARK: Sending

    /// Sends a datagram to `address:port` (4 or 16 bytes of address).
    public func send(_ bytes: [UInt8], to address: [UInt8], port: UInt16) throws {
        let sent = bytes.withUnsafeBytes { buffer in
            Self.withSocketAddress(address, port: port) { sendto(fd, buffer.baseAddress, buffer.count, 0, $0, $1) }
        }
        guard sent == bytes.count else { throw SocketError.call("sendto", errno) }
    }

    /// Sends without waiting; false if the socket buffer is full (EAGAIN) or the kernel refused it
    /// for a reason a flood can ignore (ENOBUFS).
    public func trySend(_ bytes: [UInt8], to address: [UInt8], port: UInt16) -> Bool {
        let sent = bytes.withUnsafeBytes { buffer in
            Self.withSocketAddress(address, port: port) { sendto(fd, buffer.baseAddress, buffer.count, Int32(MSG_DONTWAIT), $0, $1) }
        }
        return sent == bytes.count
    }

    /// Sends a raw frame on a packet socket.
    public func sendFrame(_ frame: [UInt8]) throws {
        let sent = frame.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, 0) }
        guard sent == frame.count else { throw SocketError.call("send(AF_PACKET)", errno) }
    }

    // MARK: Receiving

    /// Receives datagrams (or frames) until one satisfies `predicate` or the deadline passes.
    public func receive(deadline: Duration = .seconds(10), matching predicate: ([UInt8]) -> Bool) throws -> [UInt8]? {
        var found: [UInt8]?
        try receiveAll(deadline: deadline) { bytes, _ in
            if predicate(bytes) { found = bytes }
            return found != nil
        }
        return found
    }

    /// Receives until `handle` returns true (done) or the deadline passes; `handle` sees each datagram
    /// or frame with its packet type (packet sockets; `.host` for others). Returns whether it finished.
    @discardableResult
    public func receiveAll(deadline: Duration = .seconds(10), _ handle: ([UInt8], PacketType) throws -> Bool) throws -> Bool {
        let clock = ContinuousClock()
        let end = clock.now.advanced(by: deadline)
        var buffer = [UInt8](repeating: 0, count: 65536 + 256)
        var address = sockaddr_storage()
        while clock.now < end {
            guard try Poll.waitReadable([fd], timeout: clock.now.duration(to: end))[0] else { continue }
            while true {
                var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
                address = sockaddr_storage()
                let count = buffer.withUnsafeMutableBytes { raw in
                    withUnsafeMutablePointer(to: &address) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                            recvfrom(fd, raw.baseAddress, raw.count, Int32(MSG_DONTWAIT), $0, &length)
                        }
                    }
                }
                if count < 0 {
                    if errno == EAGAIN || errno == EINTR { break }
                    throw SocketError.call("recv", errno)
                }
                var type = PacketType.host
                if address.ss_family == sa_family_t(Self.afPacket) {
                    // sockaddr_ll.sll_pkttype is at offset 10.
                    type = withUnsafeBytes(of: &address) { PacketType(rawValue: $0[10]) } ?? .host
                }
                if try handle(Array(buffer.prefix(count)), type) { return true }
            }
        }
        return false
    }

    /// Discards everything queued now.
    public func drain() {
        var buffer = [UInt8](repeating: 0, count: 65536 + 256)
        while buffer.withUnsafeMutableBytes({ recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }) >= 0 {}
    }
}

/// Parsing and printing addresses.
public enum Address {
    /// "52:54:00:00:00:01" -> 6 bytes.
    public static func mac(_ text: String) -> [UInt8] {
        let bytes = text.split(separator: ":").compactMap { UInt8($0, radix: 16) }
        precondition(bytes.count == 6, "bad MAC \(text)")  // a test's constant
        return bytes
    }

    public static func macString(_ mac: [UInt8]) -> String {
        mac.map { String(format: "%02x", $0) }.joined(separator: ":")
    }

    /// "198.18.0.1" -> 4 bytes, "fd00::1" -> 16 bytes.
    public static func ip(_ text: String) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: 16)
        if inet_pton(AF_INET, text, &buffer) == 1 { return Array(buffer.prefix(4)) }
        if inet_pton(AF_INET6, text, &buffer) == 1 { return buffer }
        preconditionFailure("bad IP address \(text)")  // a test's constant
    }

    public static func ipString(_ address: [UInt8]) -> String {
        var text = [CChar](repeating: 0, count: 64)
        let family = address.count == 16 ? AF_INET6 : AF_INET
        _ = inet_ntop(family, address, &text, socklen_t(text.count))
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
