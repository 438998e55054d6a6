import Virtqueue

/// What a device is: its identity and its limits. Offered features follow from this and the backend.
public struct NetConfiguration: Sendable, Equatable {
    public var mac: MACAddress
    /// The MTU the guest is told (VIRTIO_NET_F_MTU); also the largest non-GSO frame accepted on TX.
    public var mtu: Int
    /// Queue pairs offered (max_virtqueue_pairs); more than one offers VIRTIO_NET_F_MQ.
    public var queuePairs: Int
    /// The largest ring the device accepts.
    public var maximumQueueSize: Int
    /// Offloads the user allows; nil allows all the backend supports.
    public var offloads: OffloadSet?
    /// Whether to offer mergeable receive buffers, event idx and indirect descriptors (all on by default).
    public var mergeableRxBuffers: Bool
    public var eventIndex: Bool
    public var indirectDescriptors: Bool
    /// Whether to offer the packed ring layout (VIRTIO_F_RING_PACKED) and in-order use of buffers
    /// (VIRTIO_F_IN_ORDER); both on by default. The driver chooses: QEMU uses packed rings with
    /// `packed=on`, DPDK's virtio-user with `packed_vq=1`.
    public var packedRings: Bool
    public var inOrder: Bool

    public static let minimumMTU = 68
    public static let maximumMTU = 65535
    /// Queue pairs a device may have: the most a TAP serves (MAX_TAP_QUEUES), well within virtio's
    /// 32768. (vhost-user addresses at most 256 rings, so a vhost-user device has at most 128.)
    public static let maximumQueuePairs = 256

    public init(mac: MACAddress, mtu: Int = 1500, queuePairs: Int = 1, maximumQueueSize: Int = 1024,
                offloads: OffloadSet? = nil, mergeableRxBuffers: Bool = true, eventIndex: Bool = true,
                indirectDescriptors: Bool = true, packedRings: Bool = true, inOrder: Bool = true) {
        self.mac = mac
        self.mtu = mtu
        self.queuePairs = queuePairs
        self.maximumQueueSize = maximumQueueSize
        self.offloads = offloads
        self.mergeableRxBuffers = mergeableRxBuffers
        self.eventIndex = eventIndex
        self.indirectDescriptors = indirectDescriptors
        self.packedRings = packedRings
        self.inOrder = inOrder
    }

    /// Checks the values a user or VMM chose.
    public func validate() throws(NetDeviceError) {
        guard (Self.minimumMTU...Self.maximumMTU).contains(mtu) else {
            throw .invalidConfiguration("mtu \(mtu) is outside \(Self.minimumMTU)...\(Self.maximumMTU)")
        }
        guard (1...Self.maximumQueuePairs).contains(queuePairs) else {
            throw .invalidConfiguration("queue pairs \(queuePairs) is outside 1...\(Self.maximumQueuePairs)")
        }
        guard SplitQueue.isValidSize(maximumQueueSize) else {
            throw .invalidConfiguration("queue size \(maximumQueueSize) is not a power of two in 1...\(SplitQueue.maximumSize)")
        }
        guard !mac.isMulticast else { throw .invalidConfiguration("mac \(mac) is a multicast address") }
    }
}

/// The device-specific configuration space (virtio 1.2, 5.1.4), as the driver reads it.
public struct NetConfigSpace: Equatable, Sendable {
    public static let size = 12
    public static let statusLinkUp: UInt16 = 1
    public static let statusAnnounce: UInt16 = 2

    public var mac: MACAddress
    public var status: UInt16
    public var maxVirtqueuePairs: UInt16
    public var mtu: UInt16

    /// mac[6], le16 status, le16 max_virtqueue_pairs, le16 mtu.
    public var bytes: [UInt8] {
        var result = mac.array
        for value in [status, maxVirtqueuePairs, mtu] {
            result.append(UInt8(truncatingIfNeeded: value))
            result.append(UInt8(truncatingIfNeeded: value >> 8))
        }
        return result
    }

    /// `length` bytes from `offset`; bytes past the known fields read as zero, as in QEMU.
    public func read(offset: Int, length: Int) -> [UInt8] {
        let all = bytes
        return (0..<max(0, length)).map { index in
            let position = offset + index
            return position >= 0 && position < all.count ? all[position] : 0
        }
    }
}
