/// The receive filter the driver programs through the control queue (virtio 1.2, 5.1.6.5.1-2).
public struct ReceiveFilter: Equatable, Sendable {
    /// QEMU starts promiscuous until the driver says otherwise; Linux turns it off when CTRL_RX is on.
    public var promiscuous = true
    public var allMulticast = false
    public var allUnicast = false
    public var noMulticast = false
    public var noUnicast = false
    public var noBroadcast = false
    public var unicast: [MACAddress] = []
    public var multicast: [MACAddress] = []
    /// More entries than the table holds: accept the whole class, as QEMU does.
    public var unicastOverflow = false
    public var multicastOverflow = false

    public static let tableEntries = 64

    public init() {}

    /// Whether a frame for `destination` reaches a guest whose own address is `mac`.
    @inlinable
    public func accepts(destination: MACAddress, mac: MACAddress) -> Bool {
        if promiscuous { return true }
        if destination.isBroadcast { return !noBroadcast }
        if destination.isMulticast {
            if noMulticast { return false }
            if allMulticast || multicastOverflow { return true }
            return multicast.contains(destination)
        }
        if noUnicast { return false }
        if allUnicast || unicastOverflow { return true }
        return destination == mac || unicast.contains(destination)
    }
}

/// Control-queue classes and commands (virtio 1.2, 5.1.6.5).
public enum ControlClass: UInt8, Sendable {
    case rx = 0
    case mac = 1
    case vlan = 2
    case announce = 3
    case mq = 4
    case guestOffloads = 5
}

public enum ControlAck: UInt8, Sendable {
    case ok = 0
    case error = 1
}

/// What a control command asks of the device beyond its own state.
public enum ControlEffect: Equatable, Sendable {
    case none
    case setQueuePairs(Int)
    case setGuestOffloads(VirtioNetFeatures)
    case setMAC(MACAddress)
}

/// State changed by the control queue, and the command interpreter. Every byte comes from the guest.
public struct ControlState: Equatable, Sendable {
    public var filter = ReceiveFilter()
    public var activeQueuePairs = 1
    /// Guest offloads currently enabled (starts as the negotiated ones).
    public var guestOffloads: VirtioNetFeatures = []

    public init() {}

    /// Executes one command: `command` is the device-readable part of the chain (class, command,
    /// data). Returns the ack byte and what the device must do for an OK.
    public mutating func execute(_ command: [UInt8], negotiated: VirtioNetFeatures, maxQueuePairs: Int) -> (ControlAck, ControlEffect) {
        guard command.count >= 2 else { return (.error, .none) }
        let data = command[2...]
        let code = command[1]
        switch ControlClass(rawValue: command[0]) {
        case .rx:
            guard negotiated.contains(.ctrlRx), data.count == 1, data.first! <= 1 else { return (.error, .none) }
            let on = data.first! == 1
            switch code {
            case 0: filter.promiscuous = on
            case 1: filter.allMulticast = on
            case 2: filter.allUnicast = on
            case 3: filter.noMulticast = on
            case 4: filter.noUnicast = on
            case 5: filter.noBroadcast = on
            default: return (.error, .none)
            }
            return (.ok, .none)
        case .mac:
            switch code {
            case 0:  // VIRTIO_NET_CTRL_MAC_TABLE_SET: unicast table, then multicast table
                guard negotiated.contains(.ctrlRx) else { return (.error, .none) }
                guard let (unicast, unicastEnd) = Self.parseMACTable(data, from: data.startIndex),
                      let (multicast, multicastEnd) = Self.parseMACTable(data, from: unicastEnd),
                      multicastEnd == data.endIndex
                else { return (.error, .none) }
                filter.unicastOverflow = unicast.count > ReceiveFilter.tableEntries
                filter.multicastOverflow = multicast.count > ReceiveFilter.tableEntries
                filter.unicast = filter.unicastOverflow ? [] : unicast
                filter.multicast = filter.multicastOverflow ? [] : multicast
                return (.ok, .none)
            case 1:  // VIRTIO_NET_CTRL_MAC_ADDR_SET
                guard negotiated.contains(.ctrlMACAddress), let mac = MACAddress(data), !mac.isMulticast else {
                    return (.error, .none)
                }
                return (.ok, .setMAC(mac))
            default:
                return (.error, .none)
            }
        case .mq:
            // VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, le16 virtqueue_pairs in 1...max_virtqueue_pairs.
            guard negotiated.contains(.mq), code == 0, data.count == 2 else { return (.error, .none) }
            let pairs = Int(UInt16(data[data.startIndex]) | UInt16(data[data.startIndex + 1]) << 8)
            guard pairs >= 1, pairs <= maxQueuePairs else { return (.error, .none) }
            activeQueuePairs = pairs
            return (.ok, .setQueuePairs(pairs))
        case .guestOffloads:
            // VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, le64 offloads, limited to negotiated guest offloads.
            guard negotiated.contains(.ctrlGuestOffloads), code == 0, data.count == 8 else { return (.error, .none) }
            var raw: UInt64 = 0
            for (shift, byte) in data.enumerated() { raw |= UInt64(byte) << UInt64(8 * shift) }
            let requested = VirtioNetFeatures(rawValue: raw)
            let allowed = negotiated.intersection(VirtioNetFeatures.guestOffloads)
            guard allowed.isSuperset(of: requested), requested.missingPrerequisite == nil else { return (.error, .none) }
            guestOffloads = requested
            return (.ok, .setGuestOffloads(requested))
        case .vlan, .announce, nil:
            // Not offered (CTRL_VLAN, GUEST_ANNOUNCE), or an unknown class.
            return (.error, .none)
        }
    }

    /// le32 entries, then entries * 6 bytes; nil when the length does not add up.
    static func parseMACTable(_ data: ArraySlice<UInt8>, from start: Int) -> ([MACAddress], Int)? {
        guard data.endIndex - start >= 4 else { return nil }
        var entries: UInt64 = 0
        for offset in 0..<4 { entries |= UInt64(data[start + offset]) << UInt64(8 * offset) }
        let bytes = entries * 6
        let tableStart = start + 4
        guard bytes <= UInt64(data.endIndex - tableStart) else { return nil }
        let count = Int(entries)
        var table: [MACAddress] = []
        table.reserveCapacity(min(count, ReceiveFilter.tableEntries + 1))
        for index in 0..<count {
            let offset = tableStart + 6 * index
            table.append(MACAddress(data[offset..<offset + 6])!)
        }
        return (table, tableStart + 6 * count)
    }
}
