/// virtio_net_hdr_v1 (virtio 1.2, 5.1.6): the 12 bytes in front of every frame, which is also the
/// TAP's vnet header (TUNSETVNETHDRSZ 12). Parsed from and written as explicit little-endian bytes.
public struct VirtioNetHeader: Equatable, Sendable {
    /// The header of virtio 1.x, and of legacy drivers with mergeable receive buffers.
    public static let size = 12
    /// The legacy header without `num_buffers` (no VERSION_1, no MRG_RXBUF).
    public static let legacySize = 10

    /// The header in front of every frame under `features` (virtio 1.2, 5.1.6 and its legacy notes).
    public static func size(for features: VirtioNetFeatures) -> Int {
        features.contains(.version1) || features.contains(.mergeableRxBuffers) ? size : legacySize
    }

    public struct Flags: OptionSet, Sendable, Equatable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        public static let needsCsum = Flags(rawValue: 1)
        public static let dataValid = Flags(rawValue: 2)
        public static let rscInfo = Flags(rawValue: 4)
    }

    public enum GSOType: UInt8, Sendable {
        case none = 0
        case tcpv4 = 1
        case udp = 3
        case tcpv6 = 4
        case udpL4 = 5
    }
    public static let gsoECNBit: UInt8 = 0x80

    public var flags: Flags
    /// The raw gso_type byte, ECN bit included (validated separately: the guest wrote it).
    public var gsoTypeRaw: UInt8
    public var headerLength: UInt16
    public var gsoSize: UInt16
    public var csumStart: UInt16
    public var csumOffset: UInt16
    public var numBuffers: UInt16

    public init(flags: Flags = [], gsoType: GSOType = .none, ecn: Bool = false, headerLength: UInt16 = 0,
                gsoSize: UInt16 = 0, csumStart: UInt16 = 0, csumOffset: UInt16 = 0, numBuffers: UInt16 = 0) {
        self.flags = flags
        self.gsoTypeRaw = gsoType.rawValue | (ecn ? Self.gsoECNBit : 0)
        self.headerLength = headerLength
        self.gsoSize = gsoSize
        self.csumStart = csumStart
        self.csumOffset = csumOffset
        self.numBuffers = numBuffers
    }

    public var gsoType: GSOType? { GSOType(rawValue: gsoTypeRaw & ~Self.gsoECNBit) }
    public var ecn: Bool { gsoTypeRaw & Self.gsoECNBit != 0 }

    /// Parses 12 bytes (which the caller has already copied out of guest memory).
    public init(bytes: UnsafeRawBufferPointer) {
        precondition(bytes.count >= Self.size, "caller passes a 12-byte header")  // internal invariant
        flags = Flags(rawValue: bytes[0])
        gsoTypeRaw = bytes[1]
        headerLength = UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        gsoSize = UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        csumStart = UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        csumOffset = UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
        numBuffers = UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: 10, as: UInt16.self))
    }

    public init(_ bytes: [UInt8]) {
        self = bytes.withUnsafeBytes { VirtioNetHeader(bytes: $0) }
    }

    /// Writes the 12 bytes into `destination`.
    public func write(to destination: UnsafeMutableRawBufferPointer) {
        precondition(destination.count >= Self.size, "caller passes 12 bytes of room")
        destination[0] = flags.rawValue
        destination[1] = gsoTypeRaw
        destination.storeBytes(of: headerLength.littleEndian, toByteOffset: 2, as: UInt16.self)
        destination.storeBytes(of: gsoSize.littleEndian, toByteOffset: 4, as: UInt16.self)
        destination.storeBytes(of: csumStart.littleEndian, toByteOffset: 6, as: UInt16.self)
        destination.storeBytes(of: csumOffset.littleEndian, toByteOffset: 8, as: UInt16.self)
        destination.storeBytes(of: numBuffers.littleEndian, toByteOffset: 10, as: UInt16.self)
    }

    public var bytes: [UInt8] {
        var result = [UInt8](repeating: 0, count: Self.size)
        result.withUnsafeMutableBytes { write(to: $0) }
        return result
    }

    /// Why a transmitted header is refused.
    public enum Fault: Error, Equatable, Sendable, CustomStringConvertible {
        case unknownFlags(UInt8)
        case checksumNotNegotiated
        case checksumOutsideFrame(start: UInt16, offset: UInt16, frameLength: Int)
        case unknownGSOType(UInt8)
        case gsoNotNegotiated(UInt8)
        case gsoSizeZero

        public var description: String {
            switch self {
            case let .unknownFlags(flags): "unknown header flags 0x\(String(flags, radix: 16))"
            case .checksumNotNegotiated: "NEEDS_CSUM without VIRTIO_NET_F_CSUM"
            case let .checksumOutsideFrame(start, offset, length): "csum_start \(start) + csum_offset \(offset) is beyond the \(length)-byte frame"
            case let .unknownGSOType(type): "unknown gso_type \(type)"
            case let .gsoNotNegotiated(type): "gso_type \(type) without its HOST_* feature"
            case .gsoSizeZero: "GSO frame with gso_size 0"
            }
        }
    }

    /// Checks a header the guest sent with a frame of `frameLength` bytes (after the header) against
    /// what was negotiated. The kernel validates again; this keeps garbage out and counts it.
    public func validateForTransmit(frameLength: Int, features: VirtioNetFeatures) throws(Fault) {
        let known: Flags = [.needsCsum, .dataValid]
        guard flags.subtracting(known).isEmpty else { throw .unknownFlags(flags.rawValue) }
        if flags.contains(.needsCsum) {
            guard features.contains(.csum) else { throw .checksumNotNegotiated }
            // The 16-bit checksum field must lie inside the frame.
            guard Int(csumStart) + Int(csumOffset) + 2 <= frameLength else {
                throw .checksumOutsideFrame(start: csumStart, offset: csumOffset, frameLength: frameLength)
            }
        }
        guard let type = gsoType else { throw .unknownGSOType(gsoTypeRaw) }
        let required: VirtioNetFeatures
        switch type {
        case .none: return
        case .tcpv4: required = .hostTSO4
        case .tcpv6: required = .hostTSO6
        case .udp: required = .hostUFO
        case .udpL4: required = .hostUSO
        }
        guard features.contains(required), !ecn || features.contains(.hostECN) else { throw .gsoNotNegotiated(gsoTypeRaw) }
        guard gsoSize > 0 else { throw .gsoSizeZero }
    }
}
