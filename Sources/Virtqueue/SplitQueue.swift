import CVirtioShim
import GuestMemory

/// Where a queue's three rings are. Guest-physical addresses come from a VMM; vhost-user frontends
/// give the addresses in their own address space instead.
public enum RingAddresses: Sendable, Equatable {
    case guestPhysical(descriptorTable: GuestAddress, availableRing: GuestAddress, usedRing: GuestAddress)
    case frontendVirtual(descriptorTable: UInt64, availableRing: UInt64, usedRing: UInt64)
}

/// Ring features that change how a queue behaves.
public struct RingFeatures: Sendable, Equatable {
    public var eventIndex: Bool
    public var indirectDescriptors: Bool
    public init(eventIndex: Bool = false, indirectDescriptors: Bool = false) {
        self.eventIndex = eventIndex
        self.indirectDescriptors = indirectDescriptors
    }
}

/// What identifies a chain to give it back: its head descriptor (split ring) or buffer id (packed
/// ring), and how many ring slots it took (packed: the used element skips them; split: 1).
public struct ChainHead: Hashable, Sendable, ExpressibleByIntegerLiteral, CustomStringConvertible {
    public var id: UInt16
    public var slots: UInt16

    @inlinable public init(id: UInt16, slots: UInt16 = 1) {
        self.id = id
        self.slots = slots
    }

    public init(integerLiteral value: UInt16) { self.init(id: value) }

    public var description: String { slots == 1 ? "\(id)" : "\(id) (\(slots) slots)" }
}

/// One descriptor chain, as iovecs in the caller's `IOVecArray`: device-readable ones, then writable ones.
public struct DescriptorChain: Sendable, Equatable {
    public var head: ChainHead
    public var readable: Range<Int>
    public var writable: Range<Int>
    public var readableLength: UInt32
    public var writableLength: UInt32

    @inlinable public var iovecs: Range<Int> { readable.lowerBound..<writable.upperBound }
}

/// A split virtqueue (virtio 1.2, 2.7), seen from the device.
///
/// Every field of the rings is read once from guest memory into a local, validated, and only that
/// copy is used. Ring pointers are resolved once at construction, bounds-checked against the regions.
public struct SplitQueue: DeviceQueue, @unchecked Sendable {
    public static let maximumSize = 32768

    /// Whether `size` is a ring size virtio allows: a power of two in 1...32768. The one place that
    /// says so; configurations, vhost-user messages and queue setup all ask here.
    public static func isValidSize(_ size: Int) -> Bool {
        size > 0 && size <= maximumSize && size & (size - 1) == 0
    }
    /// A hard ceiling on one chain's bytes whatever the configuration: no frame comes near it.
    public static let defaultMaximumChainLength: UInt32 = 1 << 20
    /// The most memory segments one chain may have: what one readv or writev takes (UIO_MAXIOV).
    public static let maximumSegmentsPerChain = 1024

    public let size: UInt16
    public let features: RingFeatures
    public let memory: GuestMemory
    public let maximumChainLength: UInt32

    @usableFromInline let descriptors: UnsafeMutableRawPointer
    @usableFromInline let available: UnsafeMutableRawPointer
    @usableFromInline let used: UnsafeMutableRawPointer
    @usableFromInline let mask: UInt16

    /// Where the used ring is in guest-physical memory, for dirty logging of the device's writes to it
    /// (vhost-user's log address, VHOST_VRING_F_LOG); nil: not logged.
    public var usedLogAddress: UInt64?
    /// Bytes of the used ring: flags, idx, the elements and avail_event.
    public var usedRingBytes: UInt64 { UInt64(6 + 8 * sizeForCount) }

    /// The next available-ring index the device will consume.
    public var nextAvailableIndex: UInt16
    /// The used index the device will publish next (its shadow of used.idx).
    public var nextUsedIndex: UInt16 { usedIndex }
    @usableFromInline var usedIndex: UInt16
    /// used.idx when the driver was last considered for an interrupt.
    @usableFromInline var usedIndexAtLastSignal: UInt16

    public init(
        memory: GuestMemory, size: Int, rings: RingAddresses, features: RingFeatures,
        nextAvailableIndex: UInt16 = 0, maximumChainLength: UInt32 = SplitQueue.defaultMaximumChainLength
    ) throws(QueueSetupError) {
        guard Self.isValidSize(size) else { throw .invalidSize(size) }
        let descriptorBytes = UInt64(16 * size)
        let availableBytes = UInt64(6 + 2 * size)
        let usedBytes = UInt64(6 + 8 * size)
        func resolve(_ name: String, guest: GuestAddress?, user: UInt64?, length: UInt64, alignment: UInt64) throws(QueueSetupError) -> UnsafeMutableRawPointer {
            let raw = guest?.rawValue ?? user!
            guard raw % alignment == 0 else { throw .misaligned(ring: name, address: raw) }
            do {
                if let guest { return try memory.hostPointer(guest, length: length) }
                return try memory.hostPointer(userAddress: raw, length: length)
            } catch { throw .ringOutsideMemory(ring: name, error) }
        }
        switch rings {
        case let .guestPhysical(table, availableRing, usedRing):
            descriptors = try resolve("descriptor table", guest: table, user: nil, length: descriptorBytes, alignment: 16)
            available = try resolve("available ring", guest: availableRing, user: nil, length: availableBytes, alignment: 2)
            used = try resolve("used ring", guest: usedRing, user: nil, length: usedBytes, alignment: 4)
        case let .frontendVirtual(table, availableRing, usedRing):
            descriptors = try resolve("descriptor table", guest: nil, user: table, length: descriptorBytes, alignment: 16)
            available = try resolve("available ring", guest: nil, user: availableRing, length: availableBytes, alignment: 2)
            used = try resolve("used ring", guest: nil, user: usedRing, length: usedBytes, alignment: 4)
        }
        self.size = UInt16(truncatingIfNeeded: size)  // 32768 fits; only the mask uses wrap-around
        self.mask = UInt16(size - 1)
        self.memory = memory
        self.features = features
        self.maximumChainLength = maximumChainLength
        self.nextAvailableIndex = nextAvailableIndex
        if case let .guestPhysical(_, _, usedRing) = rings { usedLogAddress = usedRing.rawValue }
        // Resuming a queue (vhost-user SET_VRING_BASE, restore): used.idx in the ring is the truth.
        let publishedUsed = cvs_load_acquire_u16(used + 2)
        self.usedIndex = UInt16(littleEndian: publishedUsed)
        self.usedIndexAtLastSignal = self.usedIndex
    }

    @inlinable var sizeForCount: Int { Int(mask) + 1 }

    @inlinable public var entries: Int { sizeForCount }

    /// The next available index (vhost-user's vring base for a split ring).
    @inlinable public var base: UInt32 { UInt32(nextAvailableIndex) }

    public func markDeviceWrites(in log: DirtyLog) {
        if let usedLogAddress { log.mark(usedLogAddress, length: usedRingBytes) }
    }

    // MARK: Available ring

    /// How many chains the driver has made available that the device has not consumed.
    @inlinable
    public func availableCount() throws(VirtqueueError) -> Int {
        let published = UInt16(littleEndian: cvs_load_acquire_u16(available + 2))
        let pending = Int(published &- nextAvailableIndex)
        guard pending <= sizeForCount else {
            throw .broken(.availableIndexJump(from: nextAvailableIndex, to: published))
        }
        return pending
    }

    /// Takes the next available chain and appends its buffers to `iovecs`. Nil when none is available.
    /// A chain has at most `maximumSegmentsPerChain` segments; `iovecs` needs that much room to take any.
    ///
    /// On `.badChain`, the chain has been consumed and nothing was appended: give it back with
    /// `addUsed(head:length: 0)`. On `.broken`, nothing was consumed.
    @inlinable @inline(__always)
    public mutating func popChain(into iovecs: inout IOVecArray) throws(VirtqueueError) -> DescriptorChain? {
        guard try availableCount() > 0 else { return nil }
        let slot = Int(nextAvailableIndex & mask)
        let head = UInt16(littleEndian: (available + 4 + 2 * slot).loadUnaligned(as: UInt16.self))
        guard head <= mask else { throw .broken(.headOutOfRange(head)) }
        nextAvailableIndex &+= 1
        let start = iovecs.count
        do {
            return try walkChain(head: head, into: &iovecs)
        } catch {
            iovecs.count = start
            throw .badChain(head: ChainHead(id: head), error)
        }
    }

    /// Puts back the last `count` popped chains, which will be popped again (e.g. the TAP would block).
    @inlinable
    public mutating func undoPop(_ count: Int) {
        nextAvailableIndex &-= UInt16(truncatingIfNeeded: count)
    }

    @usableFromInline
    func walkChain(head: UInt16, into iovecs: inout IOVecArray) throws(ChainFault) -> DescriptorChain {
        var table = UnsafeRawPointer(descriptors)
        var tableEntries = sizeForCount
        var index = Int(head)
        var hopsLeft = tableEntries
        var inIndirectTable = false
        var readableLength: UInt64 = 0
        var writableLength: UInt64 = 0
        var firstWritable: Int? = nil
        let start = iovecs.count
        while true {
            guard hopsLeft > 0 else { throw .tooManyDescriptors }
            hopsLeft -= 1
            // One read of each field; everything below uses these copies.
            let entry = table + 16 * index
            let address = UInt64(littleEndian: entry.loadUnaligned(as: UInt64.self))
            let length = UInt32(littleEndian: entry.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            let flags = UInt16(littleEndian: entry.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
            let next = UInt16(littleEndian: entry.loadUnaligned(fromByteOffset: 14, as: UInt16.self))

            if flags & DescriptorFlags.indirect != 0 {
                guard features.indirectDescriptors else { throw .indirectNotNegotiated }
                guard !inIndirectTable else { throw .nestedIndirect }
                guard flags & DescriptorFlags.next == 0 else { throw .indirectWithNext }
                guard length > 0, length % 16 == 0, Int(length / 16) <= Self.maximumSize else {
                    throw .invalidIndirectLength(length)
                }
                do {
                    table = UnsafeRawPointer(try memory.hostPointer(GuestAddress(address), length: UInt64(length)))
                } catch { throw .memory(error) }
                tableEntries = Int(length / 16)
                hopsLeft = tableEntries
                index = 0
                inIndirectTable = true
                continue
            }

            if flags & DescriptorFlags.write != 0 {
                if firstWritable == nil { firstWritable = iovecs.count }
                writableLength += UInt64(length)
            } else {
                guard firstWritable == nil else { throw .readableAfterWritable }
                readableLength += UInt64(length)
            }
            guard readableLength + writableLength <= UInt64(maximumChainLength) else {
                throw .totalLengthExceeded(limit: maximumChainLength)
            }
            do {
                try memory.appendIOVecs(GuestAddress(address), length: UInt64(length), to: &iovecs)
            } catch .tooManySegments {
                throw .tooManySegments
            } catch { throw .memory(error) }
            // One readv or writev takes no more; a longer chain could never be handed over whole.
            guard iovecs.count - start <= Self.maximumSegmentsPerChain else { throw .tooManySegments }

            guard flags & DescriptorFlags.next != 0 else { break }
            guard Int(next) < tableEntries else { throw .nextOutOfRange(next) }
            index = Int(next)
        }
        let split = firstWritable ?? iovecs.count
        // Lengths are bounded by maximumChainLength (a UInt32), so these conversions are exact.
        return DescriptorChain(
            head: ChainHead(id: head), readable: start..<split, writable: split..<iovecs.count,
            readableLength: UInt32(readableLength), writableLength: UInt32(writableLength)
        )
    }

    // MARK: Used ring

    /// Writes a used entry; the driver sees it only after `publishUsed()`.
    @inlinable
    public mutating func addUsed(head: ChainHead, length: UInt32) {
        let element = used + 4 + 8 * Int(usedIndex & mask)
        element.storeBytes(of: UInt32(head.id).littleEndian, as: UInt32.self)
        element.storeBytes(of: length.littleEndian, toByteOffset: 4, as: UInt32.self)
        usedIndex &+= 1
    }

    /// Makes every used entry added so far visible with one release store of used.idx.
    @inlinable
    public func publishUsed() {
        cvs_store_release_u16(used + 2, nextUsedIndex.littleEndian)
    }

    /// Whether the driver wants an interrupt for what was published since the last call
    /// (VIRTIO_RING_F_EVENT_IDX's used_event, or the NO_INTERRUPT flag).
    @inlinable
    public mutating func needsInterrupt() -> Bool {
        let previous = usedIndexAtLastSignal
        let current = nextUsedIndex
        usedIndexAtLastSignal = current
        guard previous != current else { return false }
        // The used.idx store must be visible before we read the driver's suppression state (2.7.10).
        cvs_fence_seq_cst()
        if features.eventIndex {
            let usedEvent = UInt16(littleEndian: (available + 4 + 2 * sizeForCount).loadUnaligned(as: UInt16.self))
            return Self.needsEvent(eventIndex: usedEvent, new: current, old: previous)
        }
        let flags = UInt16(littleEndian: available.loadUnaligned(as: UInt16.self))
        return flags & AvailableFlags.noInterrupt == 0
    }

    /// vring_need_event: has the ring crossed `eventIndex` going from `old` to `new`?
    @inlinable
    public static func needsEvent(eventIndex: UInt16, new: UInt16, old: UInt16) -> Bool {
        (new &- eventIndex &- 1) < (new &- old)
    }

    // MARK: Driver notifications (kicks)

    /// Asks the driver not to kick: a worker about to process a burst does not need to hear about it.
    @inlinable
    public func disableNotifications() {
        guard !features.eventIndex else { return }  // with event idx the stale avail_event suppresses kicks
        let flags = used.loadUnaligned(as: UInt16.self)
        used.storeBytes(of: (UInt16(littleEndian: flags) | UsedFlags.noNotify).littleEndian, as: UInt16.self)
    }

    /// Asks the driver to kick for the next buffer. Returns true when buffers arrived meanwhile, in
    /// which case the caller must process them instead of sleeping (the kick may already be lost).
    @inlinable
    public func enableNotifications() throws(VirtqueueError) -> Bool {
        if features.eventIndex {
            (used + 4 + 8 * sizeForCount).storeBytes(of: nextAvailableIndex.littleEndian, as: UInt16.self)
        } else {
            let flags = used.loadUnaligned(as: UInt16.self)
            used.storeBytes(of: (UInt16(littleEndian: flags) & ~UsedFlags.noNotify).littleEndian, as: UInt16.self)
        }
        cvs_fence_seq_cst()
        return try availableCount() > 0
    }
}

@usableFromInline enum DescriptorFlags {
    @usableFromInline static let next: UInt16 = 1
    @usableFromInline static let write: UInt16 = 2
    @usableFromInline static let indirect: UInt16 = 4
}

@usableFromInline enum AvailableFlags {
    @usableFromInline static let noInterrupt: UInt16 = 1
}

@usableFromInline enum UsedFlags {
    @usableFromInline static let noNotify: UInt16 = 1
}
