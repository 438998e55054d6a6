import CVirtioShim

/// Offloads the TAP may deliver to its reader (TUNSETOFFLOAD's TUN_F_* bits): frames read from the TAP
/// may then carry partial checksums or be GSO frames described by the vnet header. Each maps onto a
/// virtio-net GUEST_* feature.
public struct TapOffloads: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Partial checksums (VIRTIO_NET_HDR_F_NEEDS_CSUM). Every other offload requires it.
    public static let csum = TapOffloads(rawValue: CVS_TUN_F_CSUM)
    /// TCP segmentation offload for IPv4.
    public static let tso4 = TapOffloads(rawValue: CVS_TUN_F_TSO4)
    /// TCP segmentation offload for IPv6.
    public static let tso6 = TapOffloads(rawValue: CVS_TUN_F_TSO6)
    /// TSO frames with ECN (CWR) set; requires tso4 or tso6.
    public static let tsoECN = TapOffloads(rawValue: CVS_TUN_F_TSO_ECN)
    /// UDP fragmentation offload: accepted for compatibility, the kernel no longer produces UFO frames.
    public static let ufo = TapOffloads(rawValue: CVS_TUN_F_UFO)
    /// UDP segmentation offload for IPv4 (Linux 6.2+).
    public static let uso4 = TapOffloads(rawValue: CVS_TUN_F_USO4)
    /// UDP segmentation offload for IPv6 (Linux 6.2+).
    public static let uso6 = TapOffloads(rawValue: CVS_TUN_F_USO6)

    /// Every offload this type knows.
    public static let all: TapOffloads = [.csum, .tso4, .tso6, .tsoECN, .ufo, .uso4, .uso6]

    public var description: String {
        let names: [(TapOffloads, String)] = [
            (.csum, "csum"), (.tso4, "tso4"), (.tso6, "tso6"), (.tsoECN, "tso_ecn"),
            (.ufo, "ufo"), (.uso4, "uso4"), (.uso6, "uso6"),
        ]
        var parts = names.filter { contains($0.0) }.map(\.1)
        let unknown = rawValue & ~Self.all.rawValue
        if unknown != 0 { parts.append("0x" + String(unknown, radix: 16)) }
        return "[" + parts.joined(separator: ", ") + "]"
    }
}
