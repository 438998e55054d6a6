/// Building and checking Ethernet frames for tests: Ethernet, ARP, IPv4, IPv6, ICMP echo, UDP, TCP,
/// with full, partial (pseudo-header only, for VIRTIO_NET_HDR_F_NEEDS_CSUM) or deliberately wrong
/// checksums. Multi-byte fields are big-endian (network order); addresses are byte arrays (6 for a
/// MAC, 4 for IPv4, 16 for IPv6).
public enum EtherType {
    public static let ipv4: UInt16 = 0x0800
    public static let arp: UInt16 = 0x0806
    public static let ipv6: UInt16 = 0x86DD
}

public enum IPProtocol {
    public static let icmp: UInt8 = 1
    public static let tcp: UInt8 = 6
    public static let udp: UInt8 = 17
    public static let icmpv6: UInt8 = 58
}

/// The source and destination of an IP packet: what TCP and UDP checksums cover besides the segment.
public enum IPAddresses: Sendable, Equatable {
    case v4(source: [UInt8], destination: [UInt8])
    case v6(source: [UInt8], destination: [UInt8])

    public var source: [UInt8] {
        switch self { case .v4(let s, _), .v6(let s, _): s }
    }
    public var destination: [UInt8] {
        switch self { case .v4(_, let d), .v6(_, let d): d }
    }
    public var swapped: IPAddresses {
        switch self {
        case .v4(let s, let d): .v4(source: d, destination: s)
        case .v6(let s, let d): .v6(source: d, destination: s)
        }
    }
    /// Bytes of IP header in front of the transport header.
    public var headerLength: Int {
        switch self { case .v4: 20; case .v6: 40 }
    }
    public var etherType: UInt16 {
        switch self { case .v4: EtherType.ipv4; case .v6: EtherType.ipv6 }
    }
}

/// What goes into a TCP or UDP checksum field.
public enum TransportChecksum: Sendable, Equatable {
    /// Zero (for UDP over IPv4: "no checksum").
    case none
    /// The complete checksum.
    case full
    /// Only the folded pseudo-header sum, as a driver leaves it for the device to complete
    /// (VIRTIO_NET_HDR_F_NEEDS_CSUM, CHECKSUM_PARTIAL).
    case pseudoHeader
    /// Exactly this value, right or wrong.
    case value(UInt16)
}

/// TCP header flags.
public struct TCPFlags: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let fin = TCPFlags(rawValue: 0x01)
    public static let syn = TCPFlags(rawValue: 0x02)
    public static let rst = TCPFlags(rawValue: 0x04)
    public static let psh = TCPFlags(rawValue: 0x08)
    public static let ack = TCPFlags(rawValue: 0x10)
}

public enum Checksum {
    /// The 32-bit one's-complement running sum of `bytes` (big-endian 16-bit words, odd byte padded).
    public static func sum<C: Collection>(_ bytes: C, initial: UInt32 = 0) -> UInt32 where C.Element == UInt8 {
        var sum = UInt64(initial)
        var high = true
        for byte in bytes {
            sum += high ? UInt64(byte) << 8 : UInt64(byte)
            high.toggle()
        }
        while sum > 0xffff_ffff { sum = (sum & 0xffff_ffff) + (sum >> 32) }
        return UInt32(sum)
    }

    /// The sum folded to 16 bits (not complemented).
    public static func fold(_ sum: UInt32) -> UInt16 {
        var value = sum
        while value > 0xffff { value = (value & 0xffff) + (value >> 16) }
        return UInt16(value)
    }

    /// The internet checksum (RFC 1071) of `bytes`: the complement of the folded sum.
    public static func internet<C: Collection>(_ bytes: C, initial: UInt32 = 0) -> UInt16 where C.Element == UInt8 {
        ~fold(sum(bytes, initial: initial))
    }

    /// The sum of the TCP/UDP pseudo-header: addresses, protocol and the transport length.
    public static func pseudoHeaderSum(_ addresses: IPAddresses, protocol number: UInt8, length: Int) -> UInt32 {
        var header = addresses.source + addresses.destination
        switch addresses {
        case .v4: header += [0, number] + bigEndian(UInt16(truncatingIfNeeded: length))
        case .v6: header += bigEndian(UInt32(truncatingIfNeeded: length)) + [0, 0, 0, number]
        }
        return sum(header)
    }

    /// What a driver writes into the checksum field with NEEDS_CSUM: the folded pseudo-header sum,
    /// not complemented, so that the device's sum from csum_start over the segment completes it.
    public static func partial(_ addresses: IPAddresses, protocol number: UInt8, length: Int) -> UInt16 {
        fold(pseudoHeaderSum(addresses, protocol: number, length: length))
    }

    /// The complete TCP/UDP checksum of `segment` (whose checksum field must hold zero).
    public static func transport(_ addresses: IPAddresses, protocol number: UInt8, segment: [UInt8]) -> UInt16 {
        let value = internet(segment, initial: pseudoHeaderSum(addresses, protocol: number, length: segment.count))
        // UDP sends a computed zero as 0xffff (zero means "none"); TCP accepts either.
        return number == IPProtocol.udp && value == 0 ? 0xffff : value
    }

    /// Completes a partial checksum the way a device does for NEEDS_CSUM: sums the frame from
    /// `start` to the end (the field holding the pseudo-header sum) and stores the complement at
    /// `start + offset`. Returns nil if the field lies outside the frame.
    public static func complete(_ frame: [UInt8], start: Int, offset: Int) -> [UInt8]? {
        guard start >= 0, offset >= 0, start + offset + 2 <= frame.count else { return nil }
        var result = frame
        let value = internet(frame[start...])
        result[start + offset] = UInt8(value >> 8)
        result[start + offset + 1] = UInt8(value & 0xff)
        return result
    }
}

@inlinable
func bigEndian(_ value: UInt16) -> [UInt8] { [UInt8(value >> 8), UInt8(value & 0xff)] }
@inlinable
func bigEndian(_ value: UInt32) -> [UInt8] { [UInt8(value >> 24), UInt8((value >> 16) & 0xff), UInt8((value >> 8) & 0xff), UInt8(value & 0xff)] }

/// Frame and header builders.
public enum Packet {
    public static let broadcastMAC: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff]

    /// destination, source, EtherType, payload (no padding, no FCS).
    public static func ethernet(destination: [UInt8], source: [UInt8], type: UInt16, payload: [UInt8]) -> [UInt8] {
        destination + source + bigEndian(type) + payload
    }

    /// An ARP packet for IPv4 over Ethernet (operation 1 request, 2 reply).
    public static func arp(operation: UInt16, senderMAC: [UInt8], senderIP: [UInt8], targetMAC: [UInt8], targetIP: [UInt8]) -> [UInt8] {
        [0x00, 0x01, 0x08, 0x00, 6, 4] + bigEndian(operation) + senderMAC + senderIP + targetMAC + targetIP
    }

    /// A broadcast "who has `targetIP`" frame.
    public static func arpRequestFrame(senderMAC: [UInt8], senderIP: [UInt8], targetIP: [UInt8]) -> [UInt8] {
        ethernet(destination: broadcastMAC, source: senderMAC, type: EtherType.arp,
                 payload: arp(operation: 1, senderMAC: senderMAC, senderIP: senderIP, targetMAC: [0, 0, 0, 0, 0, 0], targetIP: targetIP))
    }

    /// An IPv4 header (no options, header checksum filled) followed by `payload`.
    public static func ipv4(source: [UInt8], destination: [UInt8], protocol number: UInt8, payload: [UInt8],
                            identification: UInt16 = 1, ttl: UInt8 = 64, dontFragment: Bool = true) -> [UInt8] {
        var header: [UInt8] = [0x45, 0x00] + bigEndian(UInt16(truncatingIfNeeded: 20 + payload.count)) + bigEndian(identification)
        header += [dontFragment ? 0x40 : 0x00, 0x00, ttl, number, 0, 0] + source + destination
        let checksum = Checksum.internet(header)
        header[10] = UInt8(checksum >> 8)
        header[11] = UInt8(checksum & 0xff)
        return header + payload
    }

    /// An IPv6 header (no extension headers) followed by `payload`.
    public static func ipv6(source: [UInt8], destination: [UInt8], nextHeader: UInt8, payload: [UInt8], hopLimit: UInt8 = 64) -> [UInt8] {
        [0x60, 0, 0, 0] + bigEndian(UInt16(truncatingIfNeeded: payload.count)) + [nextHeader, hopLimit] + source + destination + payload
    }

    /// An IPv4 or IPv6 header for `addresses` followed by `payload`.
    public static func ip(_ addresses: IPAddresses, protocol number: UInt8, payload: [UInt8], identification: UInt16 = 1) -> [UInt8] {
        switch addresses {
        case .v4(let source, let destination):
            ipv4(source: source, destination: destination, protocol: number, payload: payload, identification: identification)
        case .v6(let source, let destination):
            ipv6(source: source, destination: destination, nextHeader: number, payload: payload)
        }
    }

    /// An ICMP (IPv4) echo request (or reply) with its checksum.
    public static func icmpEcho(identifier: UInt16, sequence: UInt16, payload: [UInt8], reply: Bool = false) -> [UInt8] {
        var message: [UInt8] = [reply ? 0 : 8, 0, 0, 0] + bigEndian(identifier) + bigEndian(sequence) + payload
        let checksum = Checksum.internet(message)
        message[2] = UInt8(checksum >> 8)
        message[3] = UInt8(checksum & 0xff)
        return message
    }

    /// A UDP header and payload; the checksum covers the pseudo-header of `addresses`.
    public static func udp(_ addresses: IPAddresses, sourcePort: UInt16, destinationPort: UInt16, payload: [UInt8],
                           checksum: TransportChecksum = .full) -> [UInt8] {
        var segment = bigEndian(sourcePort) + bigEndian(destinationPort) + bigEndian(UInt16(truncatingIfNeeded: 8 + payload.count)) + [0, 0] + payload
        setChecksum(&segment, at: 6, addresses, protocol: IPProtocol.udp, checksum)
        return segment
    }

    /// A TCP header (20 bytes, no options) and payload; the checksum covers the pseudo-header.
    public static func tcp(_ addresses: IPAddresses, sourcePort: UInt16, destinationPort: UInt16, sequence: UInt32,
                           acknowledgment: UInt32 = 0, flags: TCPFlags = [.ack, .psh], window: UInt16 = 65535,
                           payload: [UInt8], checksum: TransportChecksum = .full) -> [UInt8] {
        var segment = bigEndian(sourcePort) + bigEndian(destinationPort) + bigEndian(sequence) + bigEndian(acknowledgment)
        segment += [0x50, flags.rawValue] + bigEndian(window) + [0, 0, 0, 0] + payload
        setChecksum(&segment, at: 16, addresses, protocol: IPProtocol.tcp, checksum)
        return segment
    }

    private static func setChecksum(_ segment: inout [UInt8], at offset: Int, _ addresses: IPAddresses, protocol number: UInt8, _ kind: TransportChecksum) {
        let value: UInt16 = switch kind {
        case .none: 0
        case .full: Checksum.transport(addresses, protocol: number, segment: segment)
        case .pseudoHeader: Checksum.partial(addresses, protocol: number, length: segment.count)
        case .value(let value): value
        }
        segment[offset] = UInt8(value >> 8)
        segment[offset + 1] = UInt8(value & 0xff)
    }

    /// Ethernet + IPv4/IPv6 + UDP in one go.
    public static func udpFrame(sourceMAC: [UInt8], destinationMAC: [UInt8], _ addresses: IPAddresses,
                                sourcePort: UInt16, destinationPort: UInt16, payload: [UInt8],
                                checksum: TransportChecksum = .full) -> [UInt8] {
        let segment = udp(addresses, sourcePort: sourcePort, destinationPort: destinationPort, payload: payload, checksum: checksum)
        return ethernet(destination: destinationMAC, source: sourceMAC, type: addresses.etherType,
                        payload: ip(addresses, protocol: IPProtocol.udp, payload: segment))
    }

    /// Ethernet + IPv4/IPv6 + TCP in one go.
    public static func tcpFrame(sourceMAC: [UInt8], destinationMAC: [UInt8], _ addresses: IPAddresses,
                                sourcePort: UInt16, destinationPort: UInt16, sequence: UInt32, acknowledgment: UInt32 = 1,
                                flags: TCPFlags = [.ack, .psh], payload: [UInt8], checksum: TransportChecksum = .full) -> [UInt8] {
        let segment = tcp(addresses, sourcePort: sourcePort, destinationPort: destinationPort, sequence: sequence,
                          acknowledgment: acknowledgment, flags: flags, payload: payload, checksum: checksum)
        return ethernet(destination: destinationMAC, source: sourceMAC, type: addresses.etherType,
                        payload: ip(addresses, protocol: IPProtocol.tcp, payload: segment))
    }

    /// Ethernet + IPv4 + ICMP echo request (or reply).
    public static func icmpEchoFrame(sourceMAC: [UInt8], destinationMAC: [UInt8], source: [UInt8], destination: [UInt8],
                                     identifier: UInt16, sequence: UInt16, payload: [UInt8], reply: Bool = false) -> [UInt8] {
        ethernet(destination: destinationMAC, source: sourceMAC, type: EtherType.ipv4,
                 payload: ipv4(source: source, destination: destination, protocol: IPProtocol.icmp,
                               payload: icmpEcho(identifier: identifier, sequence: sequence, payload: payload, reply: reply)))
    }

    /// `count` bytes of a recognisable pattern (never all zero), different for each `seed`.
    public static func pattern(count: Int, seed: UInt8 = 0) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 8 &+ Int(seed) &+ 1) }
    }
}

/// A received Ethernet frame, parsed as far as the tests look: ARP, IPv4/IPv6 (no options or
/// extension headers beyond IPv4 IHL), ICMP echo, UDP, TCP. Fields are nil when absent or truncated.
public struct ParsedFrame: Sendable {
    public let bytes: [UInt8]
    public let destinationMAC: [UInt8]
    public let sourceMAC: [UInt8]
    public let etherType: UInt16

    /// Offset of the network header (14, or 18 after a VLAN tag).
    public let networkOffset: Int
    /// Offset of the transport header, if an IP packet.
    public let transportOffset: Int?
    public let addresses: IPAddresses?
    /// Protocol (IPv4) or next header (IPv6).
    public let ipProtocol: UInt8?
    /// Bytes of IP packet the header claims (IPv4 total length, IPv6 40 + payload length).
    public let ipLength: Int?

    public init?(_ bytes: [UInt8]) {
        guard bytes.count >= 14 else { return nil }
        self.bytes = bytes
        destinationMAC = Array(bytes[0..<6])
        sourceMAC = Array(bytes[6..<12])
        var type = UInt16(bytes[12]) << 8 | UInt16(bytes[13])
        var offset = 14
        if type == 0x8100, bytes.count >= 18 {
            type = UInt16(bytes[16]) << 8 | UInt16(bytes[17])
            offset = 18
        }
        etherType = type
        networkOffset = offset
        var transport: Int?
        var addresses: IPAddresses?
        var number: UInt8?
        var length: Int?
        if type == EtherType.ipv4, bytes.count >= offset + 20, bytes[offset] >> 4 == 4 {
            let headerLength = Int(bytes[offset] & 0x0f) * 4
            if headerLength >= 20, bytes.count >= offset + headerLength {
                transport = offset + headerLength
                addresses = .v4(source: Array(bytes[offset + 12..<offset + 16]), destination: Array(bytes[offset + 16..<offset + 20]))
                number = bytes[offset + 9]
                length = Int(bytes[offset + 2]) << 8 | Int(bytes[offset + 3])
            }
        } else if type == EtherType.ipv6, bytes.count >= offset + 40, bytes[offset] >> 4 == 6 {
            transport = offset + 40
            addresses = .v6(source: Array(bytes[offset + 8..<offset + 24]), destination: Array(bytes[offset + 24..<offset + 40]))
            number = bytes[offset + 6]
            length = 40 + (Int(bytes[offset + 4]) << 8 | Int(bytes[offset + 5]))
        }
        transportOffset = transport
        self.addresses = addresses
        ipProtocol = number
        ipLength = length
    }

    private func u16(_ at: Int) -> UInt16 { UInt16(bytes[at]) << 8 | UInt16(bytes[at + 1]) }
    private func u32(_ at: Int) -> UInt32 { UInt32(u16(at)) << 16 | UInt32(u16(at + 2)) }

    /// The IP packet's end within `bytes` (frames may carry Ethernet padding after it).
    public var ipEnd: Int? {
        guard let ipLength, networkOffset + ipLength <= bytes.count else { return nil }
        return networkOffset + ipLength
    }

    /// The transport segment (header and payload), without Ethernet padding.
    public var transportSegment: ArraySlice<UInt8>? {
        guard let transportOffset, let ipEnd, transportOffset <= ipEnd else { return nil }
        return bytes[transportOffset..<ipEnd]
    }

    // MARK: ARP

    public struct ARP: Sendable, Equatable {
        public var operation: UInt16
        public var senderMAC: [UInt8]
        public var senderIP: [UInt8]
        public var targetMAC: [UInt8]
        public var targetIP: [UInt8]
    }

    public var arp: ARP? {
        let o = networkOffset
        guard etherType == EtherType.arp, bytes.count >= o + 28, u16(o) == 1, u16(o + 2) == EtherType.ipv4,
              bytes[o + 4] == 6, bytes[o + 5] == 4 else { return nil }
        return ARP(operation: u16(o + 6), senderMAC: Array(bytes[o + 8..<o + 14]), senderIP: Array(bytes[o + 14..<o + 18]),
                   targetMAC: Array(bytes[o + 18..<o + 24]), targetIP: Array(bytes[o + 24..<o + 28]))
    }

    // MARK: ICMP

    public struct ICMPEcho: Sendable, Equatable {
        public var isReply: Bool
        public var identifier: UInt16
        public var sequence: UInt16
        public var payload: [UInt8]
        public var checksumValid: Bool
    }

    /// An ICMPv4 echo request or reply.
    public var icmpEcho: ICMPEcho? {
        guard ipProtocol == IPProtocol.icmp, case .v4 = addresses, let segment = transportSegment, segment.count >= 8 else { return nil }
        let start = segment.startIndex
        let type = segment[start]
        guard (type == 0 || type == 8), segment[start + 1] == 0 else { return nil }
        return ICMPEcho(isReply: type == 0, identifier: u16(start + 4), sequence: u16(start + 6),
                        payload: Array(segment.dropFirst(8)), checksumValid: Checksum.internet(segment) == 0)
    }

    // MARK: UDP and TCP

    public struct UDP: Sendable, Equatable {
        public var sourcePort: UInt16
        public var destinationPort: UInt16
        public var length: UInt16
        public var checksum: UInt16
        public var payload: [UInt8]
    }

    public var udp: UDP? {
        guard ipProtocol == IPProtocol.udp, let segment = transportSegment, segment.count >= 8 else { return nil }
        let s = segment.startIndex
        let length = u16(s + 4)
        guard Int(length) >= 8, Int(length) <= segment.count else { return nil }
        return UDP(sourcePort: u16(s), destinationPort: u16(s + 2), length: length, checksum: u16(s + 6),
                   payload: Array(segment[(s + 8)..<(s + Int(length))]))
    }

    public struct TCP: Sendable, Equatable {
        public var sourcePort: UInt16
        public var destinationPort: UInt16
        public var sequence: UInt32
        public var acknowledgment: UInt32
        public var flags: UInt8
        public var headerLength: Int
        public var checksum: UInt16
        public var payload: [UInt8]
    }

    public var tcp: TCP? {
        guard ipProtocol == IPProtocol.tcp, let segment = transportSegment, segment.count >= 20 else { return nil }
        let s = segment.startIndex
        let headerLength = Int(segment[s + 12] >> 4) * 4
        guard headerLength >= 20, headerLength <= segment.count else { return nil }
        return TCP(sourcePort: u16(s), destinationPort: u16(s + 2), sequence: u32(s + 4), acknowledgment: u32(s + 8),
                   flags: segment[s + 13], headerLength: headerLength, checksum: u16(s + 16),
                   payload: Array(segment.dropFirst(headerLength)))
    }

    // MARK: Checksums

    /// Whether the IPv4 header checksum is right (nil for anything but IPv4).
    public var ipv4HeaderChecksumValid: Bool? {
        guard case .v4 = addresses, let transportOffset else { return nil }
        return Checksum.internet(bytes[networkOffset..<transportOffset]) == 0
    }

    /// Whether the TCP or UDP checksum is right over the pseudo-header and the whole segment (nil if
    /// the frame is neither, or truncated). A zero UDP checksum over IPv4 ("none") counts as wrong:
    /// a test that checks checksums wants one.
    public var transportChecksumValid: Bool? {
        guard let addresses, let number = ipProtocol, number == IPProtocol.tcp || number == IPProtocol.udp,
              let segment = transportSegment, segment.count >= (number == IPProtocol.tcp ? 20 : 8) else { return nil }
        if number == IPProtocol.udp && u16(segment.startIndex + 6) == 0 { return false }
        let sum = Checksum.pseudoHeaderSum(addresses, protocol: number, length: segment.count)
        return Checksum.internet(segment, initial: sum) == 0
    }

    /// Both checksums of an IPv4/IPv6 TCP or UDP frame are right (IPv6 has no header checksum).
    public var checksumsValid: Bool {
        (ipv4HeaderChecksumValid ?? true) && transportChecksumValid == true
    }

    /// IPv6 ICMPv6 (neighbour discovery, MLD): noise from a namespace's own IPv6 that tests skip.
    public var isICMPv6: Bool { ipProtocol == IPProtocol.icmpv6 }
}
