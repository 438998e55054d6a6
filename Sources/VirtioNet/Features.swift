/// Feature bits of a virtio-net device (virtio 1.2, 5.1.3) and the ring/transport bits it uses (6).
public struct VirtioNetFeatures: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    private init(bit: Int) { rawValue = 1 << UInt64(bit) }

    public static let csum = Self(bit: 0)
    public static let guestCsum = Self(bit: 1)
    public static let ctrlGuestOffloads = Self(bit: 2)
    public static let mtu = Self(bit: 3)
    public static let mac = Self(bit: 5)
    public static let guestTSO4 = Self(bit: 7)
    public static let guestTSO6 = Self(bit: 8)
    public static let guestECN = Self(bit: 9)
    public static let guestUFO = Self(bit: 10)
    public static let hostTSO4 = Self(bit: 11)
    public static let hostTSO6 = Self(bit: 12)
    public static let hostECN = Self(bit: 13)
    public static let hostUFO = Self(bit: 14)
    public static let mergeableRxBuffers = Self(bit: 15)
    public static let status = Self(bit: 16)
    public static let ctrlVQ = Self(bit: 17)
    public static let ctrlRx = Self(bit: 18)
    public static let ctrlMACAddress = Self(bit: 23)
    public static let mq = Self(bit: 22)
    public static let indirectDescriptors = Self(bit: 28)
    public static let eventIndex = Self(bit: 29)
    public static let version1 = Self(bit: 32)
    /// The packed virtqueue layout (virtio 1.2, 2.8) instead of the split one.
    public static let ringPacked = Self(bit: 34)
    /// Buffers are used in the order they were made available (virtio 1.2, 6): the device's engines
    /// always complete in order, so offering it costs nothing and lets drivers simplify.
    public static let inOrder = Self(bit: 35)
    public static let guestUSO4 = Self(bit: 54)
    public static let guestUSO6 = Self(bit: 55)
    public static let hostUSO = Self(bit: 56)

    /// Offloads the device performs for the guest on receive (the backend must produce them).
    public static let guestOffloads: Self = [.guestCsum, .guestTSO4, .guestTSO6, .guestECN, .guestUFO, .guestUSO4, .guestUSO6]
    /// Offloads the guest may ask of the device on transmit.
    public static let hostOffloads: Self = [.csum, .hostTSO4, .hostTSO6, .hostECN, .hostUFO, .hostUSO]

    /// Each feature's prerequisites (5.1.3.1): a driver must not accept one without them.
    static let requirements: [(feature: VirtioNetFeatures, needsAll: VirtioNetFeatures, needsAny: VirtioNetFeatures)] = [
        (.guestTSO4, .guestCsum, []), (.guestTSO6, .guestCsum, []), (.guestUFO, .guestCsum, []),
        (.guestUSO4, .guestCsum, []), (.guestUSO6, .guestCsum, []),
        (.guestECN, [], [.guestTSO4, .guestTSO6]),
        (.hostTSO4, .csum, []), (.hostTSO6, .csum, []), (.hostUFO, .csum, []), (.hostUSO, .csum, []),
        (.hostECN, [], [.hostTSO4, .hostTSO6]),
        (.ctrlRx, .ctrlVQ, []), (.mq, .ctrlVQ, []), (.ctrlMACAddress, .ctrlVQ, []), (.ctrlGuestOffloads, .ctrlVQ, []),
    ]

    /// What a device can honour of what a driver acknowledged, and what it leaves unused.
    ///
    /// Drivers in the field acknowledge features whose prerequisites they left out: Linux takes
    /// GUEST_TSO4 without GUEST_CSUM when QEMU runs with `guest_csum=off`. Such a feature cannot work
    /// (segmented frames need partial checksums), so it is not used, but the driver's choice stands
    /// and the device goes on with the rest, as QEMU's and DPDK's backends do.
    public var usable: (features: VirtioNetFeatures, ignored: VirtioNetFeatures) {
        var features = self
        var changed = true
        while changed {
            changed = false
            for rule in Self.requirements where features.contains(rule.feature) {
                if !features.isSuperset(of: rule.needsAll) || (!rule.needsAny.isEmpty && features.intersection(rule.needsAny).isEmpty) {
                    features.remove(rule.feature)
                    changed = true
                }
            }
        }
        return (features, subtracting(features))
    }

    /// The first feature in `self` whose prerequisites are missing from `self`.
    public var missingPrerequisite: VirtioNetFeatures? {
        for rule in Self.requirements where contains(rule.feature) {
            if !isSuperset(of: rule.needsAll) { return rule.feature }
            if !rule.needsAny.isEmpty && intersection(rule.needsAny).isEmpty { return rule.feature }
        }
        return nil
    }

    static let names: [(VirtioNetFeatures, String)] = [
        (.csum, "CSUM"), (.guestCsum, "GUEST_CSUM"), (.ctrlGuestOffloads, "CTRL_GUEST_OFFLOADS"), (.mtu, "MTU"),
        (.mac, "MAC"), (.guestTSO4, "GUEST_TSO4"), (.guestTSO6, "GUEST_TSO6"), (.guestECN, "GUEST_ECN"),
        (.guestUFO, "GUEST_UFO"), (.hostTSO4, "HOST_TSO4"), (.hostTSO6, "HOST_TSO6"), (.hostECN, "HOST_ECN"),
        (.hostUFO, "HOST_UFO"), (.mergeableRxBuffers, "MRG_RXBUF"), (.status, "STATUS"), (.ctrlVQ, "CTRL_VQ"),
        (.ctrlRx, "CTRL_RX"), (.mq, "MQ"), (.ctrlMACAddress, "CTRL_MAC_ADDR"), (.indirectDescriptors, "INDIRECT_DESC"),
        (.eventIndex, "EVENT_IDX"), (.version1, "VERSION_1"), (.ringPacked, "RING_PACKED"), (.inOrder, "IN_ORDER"), (.guestUSO4, "GUEST_USO4"), (.guestUSO6, "GUEST_USO6"),
        (.hostUSO, "HOST_USO"),
    ]

    public var description: String {
        var parts = Self.names.filter { contains($0.0) }.map(\.1)
        let unknown = rawValue & ~Self.names.reduce(0) { $0 | $1.0.rawValue }
        if unknown != 0 { parts.append("0x" + String(unknown, radix: 16)) }
        return "[" + parts.joined(separator: ", ") + "]"
    }
}

/// Offload capabilities in backend terms, one set for both directions.
public struct OffloadSet: OptionSet, Hashable, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    public static let csum = Self(rawValue: 1 << 0)
    public static let tso4 = Self(rawValue: 1 << 1)
    public static let tso6 = Self(rawValue: 1 << 2)
    public static let ecn = Self(rawValue: 1 << 3)
    public static let ufo = Self(rawValue: 1 << 4)
    public static let uso = Self(rawValue: 1 << 5)
    public static let all: Self = [.csum, .tso4, .tso6, .ecn, .ufo, .uso]

    /// The guest (receive-side) features these offloads allow.
    public var guestFeatures: VirtioNetFeatures {
        guard contains(.csum) else { return [] }
        var features: VirtioNetFeatures = [.guestCsum]
        if contains(.tso4) { features.insert(.guestTSO4) }
        if contains(.tso6) { features.insert(.guestTSO6) }
        if contains(.ecn) && !intersection([.tso4, .tso6]).isEmpty { features.insert(.guestECN) }
        if contains(.ufo) { features.insert(.guestUFO) }
        if contains(.uso) { features.formUnion([.guestUSO4, .guestUSO6]) }
        return features
    }

    /// The host (transmit-side) features these offloads allow.
    public var hostFeatures: VirtioNetFeatures {
        guard contains(.csum) else { return [] }
        var features: VirtioNetFeatures = [.csum]
        if contains(.tso4) { features.insert(.hostTSO4) }
        if contains(.tso6) { features.insert(.hostTSO6) }
        if contains(.ecn) && !intersection([.tso4, .tso6]).isEmpty { features.insert(.hostECN) }
        if contains(.ufo) { features.insert(.hostUFO) }
        if contains(.uso) { features.insert(.hostUSO) }
        return features
    }

    /// The receive offloads a backend must produce for these negotiated guest features.
    public init(guestFeatures features: VirtioNetFeatures) {
        var set: OffloadSet = []
        if features.contains(.guestCsum) { set.insert(.csum) }
        if features.contains(.guestTSO4) { set.insert(.tso4) }
        if features.contains(.guestTSO6) { set.insert(.tso6) }
        if features.contains(.guestECN) { set.insert(.ecn) }
        if features.contains(.guestUFO) { set.insert(.ufo) }
        if !features.intersection([.guestUSO4, .guestUSO6]).isEmpty { set.insert(.uso) }
        self = set
    }
}
