import GuestMemory

/// Why one descriptor chain was refused. The chain is the guest's mistake; the queue goes on.
public enum ChainFault: Error, Equatable, Sendable, CustomStringConvertible {
    /// `next` points past the descriptor table it belongs to.
    case nextOutOfRange(UInt16)
    /// More hops than the table has entries: a loop, or a chain longer than the queue.
    case tooManyDescriptors
    /// The chain's total length passes the queue's cap.
    case totalLengthExceeded(limit: UInt32)
    /// A device-readable descriptor after a device-writable one (spec 2.7.4.2).
    case readableAfterWritable
    /// An indirect descriptor inside an indirect table.
    case nestedIndirect
    /// An indirect table whose length is 0, not a multiple of 16, or too large.
    case invalidIndirectLength(UInt32)
    /// INDIRECT together with NEXT.
    case indirectWithNext
    /// INDIRECT used without VIRTIO_F_INDIRECT_DESC negotiated.
    case indirectNotNegotiated
    /// A buffer (or indirect table) outside guest memory.
    case memory(GuestMemoryError)
    /// More memory segments than one chain may have (`SplitQueue.maximumSegmentsPerChain`), or than
    /// the caller's iovec array has room for.
    case tooManySegments

    public var description: String {
        switch self {
        case let .nextOutOfRange(next): "next index \(next) is outside the descriptor table"
        case .tooManyDescriptors: "descriptor chain loops or is longer than its table"
        case let .totalLengthExceeded(limit): "descriptor chain is longer than \(limit) bytes"
        case .readableAfterWritable: "device-readable descriptor after a device-writable one"
        case .nestedIndirect: "indirect descriptor inside an indirect table"
        case let .invalidIndirectLength(length): "indirect table length \(length) is invalid"
        case .indirectWithNext: "descriptor has both INDIRECT and NEXT"
        case .indirectNotNegotiated: "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
        case let .memory(error): "buffer: \(error)"
        case .tooManySegments: "too many memory segments in one chain"
        }
    }
}

/// Why a whole queue can no longer be trusted: the device needs a reset (spec 2.1.2, DEVICE_NEEDS_RESET).
public enum QueueFault: Error, Equatable, Sendable, CustomStringConvertible {
    /// avail.idx moved further than the queue has entries.
    case availableIndexJump(from: UInt16, to: UInt16)
    /// The available ring names a head descriptor past the table.
    case headOutOfRange(UInt16)
    /// The frontend took guest memory away: the file behind it shrank while mapped.
    case guestMemoryLost
    /// A packed ring chain whose end cannot be found: a descriptor inside it is not available, or it
    /// is longer than the ring.
    case chainWithoutEnd

    public var description: String {
        switch self {
        case let .availableIndexJump(from, to): "available index moved from \(from) to \(to), more than the queue size"
        case let .headOutOfRange(head): "available ring names descriptor \(head), outside the table"
        case .guestMemoryLost: "guest memory shrank under the device (its file was truncated while mapped)"
        case .chainWithoutEnd: "packed ring chain has no end: a descriptor inside it is not available, or it is longer than the ring"
        }
    }
}

public enum VirtqueueError: Error, Equatable, Sendable, CustomStringConvertible {
    /// This chain is bad; return it to the guest as used (length 0) and continue.
    case badChain(head: ChainHead, ChainFault)
    /// The queue is broken; stop using it until the driver resets the device.
    case broken(QueueFault)

    public var description: String {
        switch self {
        case let .badChain(head, fault): "chain \(head): \(fault)"
        case let .broken(fault): "queue broken: \(fault)"
        }
    }
}

/// Errors setting a queue up: the driver (or VMM) described rings the device cannot use.
public enum QueueSetupError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidSize(Int)
    case misaligned(ring: String, address: UInt64)
    case ringOutsideMemory(ring: String, GuestMemoryError)
    /// A ring position past the ring (packed: either index; split: more than 16 bits).
    case invalidBase(UInt32)

    public var description: String {
        switch self {
        case let .invalidSize(size): "queue size \(size) is not a power of two in 1...32768"
        case let .misaligned(ring, address): "\(ring) at 0x\(String(address, radix: 16)) is misaligned"
        case let .ringOutsideMemory(ring, error): "\(ring): \(error)"
        case let .invalidBase(base): "ring position 0x\(String(base, radix: 16)) is outside the ring"
        }
    }
}
