import CVirtioShim
import GuestMemory

/// A packed virtqueue (virtio 1.2, 2.8), seen from the device.
///
/// One ring of 16-byte descriptors serves both directions: the driver marks a descriptor available
/// by setting its AVAIL flag to its wrap counter and USED to the opposite; the device marks a chain
/// used by writing one descriptor (the buffer id, the length, AVAIL and USED both equal to its own
/// wrap counter) where the chain began, in the order chains complete, and skips the chain's slots.
/// A batch of used descriptors becomes visible at once: the first one's flags are written last.
///
/// As with the split ring, every descriptor field is read once and the copy validated. A chain the
/// device can walk to its end but cannot use is a bad chain (given back with length 0); a chain it
/// cannot find the end of (a descriptor in the middle not available, longer than the ring) means the
/// ring is broken.
///
/// Its three areas come as `RingAddresses`: the descriptor ring as the descriptor table, the driver
/// event suppression area as the available ring, the device's as the used ring (vhost-user's
/// SET_VRING_ADDR gives them the same way).
public struct PackedQueue: DeviceQueue, @unchecked Sendable {
    public let size: Int
    public let features: RingFeatures
    public let memory: GuestMemory
    public let maximumChainLength: UInt32

    @usableFromInline let descriptors: UnsafeMutableRawPointer
    /// The driver's event suppression area (read by the device: does the driver want interrupts?).
    @usableFromInline let driverEvent: UnsafeMutableRawPointer
    /// The device's event suppression area (written by the device: does it want kicks?).
    @usableFromInline let deviceEvent: UnsafeMutableRawPointer
    /// Guest-physical addresses of the descriptor ring and the device area, for dirty logging.
    @usableFromInline let descriptorsGuestAddress: UInt64?
    @usableFromInline let deviceEventGuestAddress: UInt64?

    /// The next descriptor the device reads, and the wrap counter an available one there carries.
    @usableFromInline var nextAvail: Int
    @usableFromInline var availWrap: Bool
    /// Where the next used descriptor goes, and the wrap counter it carries.
    @usableFromInline var nextUsed: Int
    @usableFromInline var usedWrap: Bool
    /// Used descriptors written since the last publication: the first one's flags wait until then.
    @usableFromInline var pendingFirst: Int = -1
    @usableFromInline var pendingFlags: UInt16 = 0
    /// Where used descriptors were when the driver was last considered for an interrupt.
    @usableFromInline var signalledUsed: Int
    @usableFromInline var signalledWrap: Bool
    /// Chains popped and not yet given back, oldest first: where each started (for `undoPop`).
    @usableFromInline let outstanding: UnsafeMutablePointer<(position: Int32, wrap: Bool)>
    @usableFromInline let outstandingHolder: OutstandingStorage
    @usableFromInline var outstandingFirst = 0
    @usableFromInline var outstandingCount = 0

    /// Owns the outstanding-chain list (a struct cannot deinitialise memory).
    @usableFromInline final class OutstandingStorage: @unchecked Sendable {
        let pointer: UnsafeMutablePointer<(position: Int32, wrap: Bool)>
        init(capacity: Int) { pointer = .allocate(capacity: capacity) }
        deinit { pointer.deallocate() }
    }

    public static let maximumSize = 32768

    @usableFromInline enum Flags {
        @usableFromInline static let next: UInt16 = 1
        @usableFromInline static let write: UInt16 = 2
        @usableFromInline static let indirect: UInt16 = 4
        @usableFromInline static let available: UInt16 = 1 << 7
        @usableFromInline static let used: UInt16 = 1 << 15
    }

    @usableFromInline enum EventFlags {
        @usableFromInline static let enable: UInt16 = 0
        @usableFromInline static let disable: UInt16 = 1
        @usableFromInline static let descriptor: UInt16 = 2
    }

    /// - Parameters:
    ///   - rings: the descriptor ring as `descriptorTable`, the driver area as `availableRing`, the
    ///     device area as `usedRing`.
    ///   - base: where to resume, vhost-user's encoding: next available index and its wrap counter
    ///     (bit 15), next used index and its wrap counter (bits 16...30 and 31), as QEMU sends it. A
    ///     base whose upper half is 0 is DPDK's 16-bit form, which assumes nothing is in flight: the
    ///     used position is the available one. 0 is not a fresh queue: a fresh queue starts with both
    ///     wrap counters set (`freshBase`).
    public init(
        memory: GuestMemory, size: Int, rings: RingAddresses, features: RingFeatures,
        base: UInt32 = PackedQueue.freshBase, maximumChainLength: UInt32 = SplitQueue.defaultMaximumChainLength
    ) throws(QueueSetupError) {
        guard size > 0, size <= Self.maximumSize else { throw .invalidSize(size) }
        func resolve(_ name: String, guest: GuestAddress?, user: UInt64?, length: UInt64, alignment: UInt64)
            throws(QueueSetupError) -> (UnsafeMutableRawPointer, UInt64?)
        {
            let raw = guest?.rawValue ?? user ?? 0
            guard raw % alignment == 0 else { throw .misaligned(ring: name, address: raw) }
            do {
                if let guest { return (try memory.hostPointer(guest, length: length), guest.rawValue) }
                return (try memory.hostPointer(userAddress: raw, length: length), memory.guestAddress(userAddress: raw)?.rawValue)
            } catch { throw .ringOutsideMemory(ring: name, error) }
        }
        let ringBytes = UInt64(16 * size)
        switch rings {
        case let .guestPhysical(table, driverArea, deviceArea):
            (descriptors, descriptorsGuestAddress) = try resolve("descriptor ring", guest: table, user: nil, length: ringBytes, alignment: 16)
            (driverEvent, _) = try resolve("driver area", guest: driverArea, user: nil, length: 4, alignment: 4)
            (deviceEvent, deviceEventGuestAddress) = try resolve("device area", guest: deviceArea, user: nil, length: 4, alignment: 4)
        case let .frontendVirtual(table, driverArea, deviceArea):
            (descriptors, descriptorsGuestAddress) = try resolve("descriptor ring", guest: nil, user: table, length: ringBytes, alignment: 16)
            (driverEvent, _) = try resolve("driver area", guest: nil, user: driverArea, length: 4, alignment: 4)
            (deviceEvent, deviceEventGuestAddress) = try resolve("device area", guest: nil, user: deviceArea, length: 4, alignment: 4)
        }
        let given = base
        let base = base >> 16 == 0 ? base | base << 16 : base
        let availIndex = Int(base & 0x7fff), usedIndex = Int((base >> 16) & 0x7fff)
        guard availIndex < size, usedIndex < size else { throw .invalidBase(given) }
        self.size = size
        self.features = features
        self.memory = memory
        self.maximumChainLength = maximumChainLength
        nextAvail = availIndex
        availWrap = base & 0x8000 != 0
        nextUsed = usedIndex
        usedWrap = base & 0x8000_0000 != 0
        signalledUsed = usedIndex
        signalledWrap = usedWrap
        outstandingHolder = OutstandingStorage(capacity: size)
        outstanding = outstandingHolder.pointer
    }

    /// The base of a queue nothing has happened on yet: both indices 0, both wrap counters 1.
    public static let freshBase: UInt32 = 0x8000_8000

    @inlinable public var entries: Int { size }

    /// Next available index and wrap counter (bits 0...15), next used index and wrap counter
    /// (bits 16...31), as QEMU and vhost-user encode a packed ring's position.
    @inlinable public var base: UInt32 {
        UInt32(nextAvail) | (availWrap ? 0x8000 : 0) | UInt32(nextUsed) << 16 | (usedWrap ? 0x8000_0000 : 0)
    }

    // MARK: Available descriptors

    /// The flags of descriptor `index`, loaded with acquire ordering (the rest of it is read after).
    @inlinable func flags(at index: Int) -> UInt16 {
        UInt16(littleEndian: cvs_load_acquire_u16(descriptors + 16 * index + 14))
    }

    @inlinable func isAvailable(_ flags: UInt16, wrap: Bool) -> Bool {
        (flags & Flags.available != 0) == wrap && (flags & Flags.used != 0) != wrap
    }

    @inlinable public mutating func popChain(into iovecs: inout IOVecArray) throws(VirtqueueError) -> DescriptorChain? {
        let first = flags(at: nextAvail)
        guard isAvailable(first, wrap: availWrap) else { return nil }
        let start = iovecs.count
        let startPosition = nextAvail, startWrap = availWrap
        let walked: (chain: DescriptorChain?, slots: Int, id: UInt16, fault: ChainFault?)
        do {
            walked = try walkChain(into: &iovecs)
        } catch {
            iovecs.count = start
            throw .broken(error)
        }
        // The chain's slots are consumed whatever it held.
        nextAvail += walked.slots
        if nextAvail >= size {
            nextAvail -= size
            availWrap.toggle()
        }
        outstanding[(outstandingFirst + outstandingCount) % size] = (Int32(startPosition), startWrap)
        outstandingCount += 1
        if let fault = walked.fault {
            iovecs.count = start
            throw .badChain(head: ChainHead(id: walked.id, slots: UInt16(walked.slots)), fault)
        }
        return walked.chain
    }

    /// Walks the chain at `nextAvail`: its buffers into `iovecs`, how many ring slots it takes and its
    /// buffer id; a fault for a chain that cannot be used (its extent is known), a throw for one whose
    /// end cannot be found (the ring is broken).
    @usableFromInline
    func walkChain(into iovecs: inout IOVecArray) throws(QueueFault) -> (chain: DescriptorChain?, slots: Int, id: UInt16, fault: ChainFault?) {
        var position = nextAvail
        var wrap = availWrap
        var slots = 0
        var fault: ChainFault? = nil
        var readableLength: UInt64 = 0
        var writableLength: UInt64 = 0
        var firstWritable: Int? = nil
        var id: UInt16 = 0
        let start = iovecs.count

        func append(address: UInt64, length: UInt32, writable: Bool) {
            guard fault == nil else { return }
            if writable {
                if firstWritable == nil { firstWritable = iovecs.count }
                writableLength += UInt64(length)
            } else {
                guard firstWritable == nil else { fault = .readableAfterWritable; return }
                readableLength += UInt64(length)
            }
            guard readableLength + writableLength <= UInt64(maximumChainLength) else {
                fault = .totalLengthExceeded(limit: maximumChainLength)
                return
            }
            do {
                try memory.appendIOVecs(GuestAddress(address), length: UInt64(length), to: &iovecs)
            } catch .tooManySegments {
                fault = .tooManySegments
                return
            } catch {
                fault = .memory(error)
                return
            }
            if iovecs.count - start > SplitQueue.maximumSegmentsPerChain { fault = .tooManySegments }
        }

        while true {
            guard slots < size else { throw .chainWithoutEnd }
            // One read of each field; the flags with acquire ordering first.
            let flags = self.flags(at: position)
            guard isAvailable(flags, wrap: wrap) else { throw .chainWithoutEnd }
            let entry = UnsafeRawPointer(descriptors + 16 * position)
            let address = UInt64(littleEndian: entry.loadUnaligned(as: UInt64.self))
            let length = UInt32(littleEndian: entry.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            id = UInt16(littleEndian: entry.loadUnaligned(fromByteOffset: 12, as: UInt16.self))
            slots += 1
            position += 1
            if position == size {
                position = 0
                wrap.toggle()
            }
            if flags & Flags.indirect != 0 {
                if fault == nil {
                    if !features.indirectDescriptors {
                        fault = .indirectNotNegotiated
                    } else if flags & Flags.next != 0 || slots > 1 {
                        // An indirect table is a chain of its own: never linked to others.
                        fault = .indirectWithNext
                    } else if length == 0 || length % 16 != 0 || Int(length / 16) > Self.maximumSize {
                        fault = .invalidIndirectLength(length)
                    } else {
                        if let tableFault = walkIndirect(address: address, length: length, append: { address, length, writable in
                            append(address: address, length: length, writable: writable)
                            return fault == nil
                        }) {
                            fault = tableFault
                        }
                    }
                }
            } else {
                append(address: address, length: length, writable: flags & Flags.write != 0)
            }
            if flags & Flags.next == 0 { break }
        }
        if let fault { return (nil, slots, id, fault) }
        let split = firstWritable ?? iovecs.count
        let chain = DescriptorChain(
            head: ChainHead(id: id, slots: UInt16(slots)), readable: start..<split, writable: split..<iovecs.count,
            readableLength: UInt32(readableLength), writableLength: UInt32(writableLength))
        return (chain, slots, id, nil)
    }

    /// The descriptors of an indirect table, each one element of the buffer (only WRITE counts), given
    /// to `append` while it returns true; the table's own fault, if it has one.
    @usableFromInline
    func walkIndirect(address: UInt64, length: UInt32, append: (UInt64, UInt32, Bool) -> Bool) -> ChainFault? {
        let table: UnsafeRawPointer
        do { table = UnsafeRawPointer(try memory.hostPointer(GuestAddress(address), length: UInt64(length))) } catch {
            return .memory(error)
        }
        for index in 0..<Int(length / 16) {
            let entry = table + 16 * index
            let elementAddress = UInt64(littleEndian: entry.loadUnaligned(as: UInt64.self))
            let elementLength = UInt32(littleEndian: entry.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
            let elementFlags = UInt16(littleEndian: entry.loadUnaligned(fromByteOffset: 14, as: UInt16.self))
            guard elementFlags & Flags.indirect == 0 else { return .nestedIndirect }
            guard append(elementAddress, elementLength, elementFlags & Flags.write != 0) else { return nil }
        }
        return nil
    }

    @inlinable public mutating func undoPop(_ count: Int) {
        guard count > 0 else { return }
        let taken = min(count, outstandingCount)
        outstandingCount -= taken
        let oldest = outstanding[(outstandingFirst + outstandingCount) % size]
        nextAvail = Int(oldest.position)
        availWrap = oldest.wrap
    }

    // MARK: Used descriptors

    @inlinable public mutating func addUsed(head: ChainHead, length: UInt32) {
        if outstandingCount > 0 {
            outstandingFirst = (outstandingFirst + 1) % size
            outstandingCount -= 1
        }
        let entry = descriptors + 16 * nextUsed
        entry.storeBytes(of: length.littleEndian, toByteOffset: 8, as: UInt32.self)
        entry.storeBytes(of: head.id.littleEndian, toByteOffset: 12, as: UInt16.self)
        let flags: UInt16 = (usedWrap ? Flags.available | Flags.used : 0) | (length > 0 ? Flags.write : 0)
        if pendingFirst < 0 {
            // The batch's first: its flags are written at publication, after all the others.
            pendingFirst = nextUsed
            pendingFlags = flags
        } else {
            cvs_store_release_u16(entry + 14, flags.littleEndian)
        }
        nextUsed += max(1, Int(head.slots))
        if nextUsed >= size {
            nextUsed -= size
            usedWrap.toggle()
        }
    }

    @inlinable public mutating func publishUsed() {
        guard pendingFirst >= 0 else { return }
        cvs_store_release_u16(descriptors + 16 * pendingFirst + 14, pendingFlags.littleEndian)
        pendingFirst = -1
    }

    /// With event idx, the driver names the used descriptor (offset and wrap counter) it wants an
    /// interrupt for; otherwise it turns interrupts on or off.
    @inlinable public mutating func needsInterrupt() -> Bool {
        let old = signalledUsed, oldWrap = signalledWrap
        signalledUsed = nextUsed
        signalledWrap = usedWrap
        guard old != nextUsed || oldWrap != usedWrap else { return false }
        cvs_fence_seq_cst()
        let eventFlags = UInt16(littleEndian: driverEvent.loadUnaligned(fromByteOffset: 2, as: UInt16.self)) & 3
        if eventFlags != EventFlags.descriptor || !features.eventIndex { return eventFlags != EventFlags.disable }
        let offWrap = UInt16(littleEndian: driverEvent.loadUnaligned(as: UInt16.self))
        // Positions as a count of used descriptors modulo 2^16, the previous lap below 0 (as Linux
        // and DPDK compute it).
        var offset = Int(offWrap & 0x7fff)
        if (offWrap & 0x8000 != 0) != usedWrap { offset -= size }
        var previous = old
        if oldWrap != usedWrap { previous -= size }
        return SplitQueue.needsEvent(eventIndex: UInt16(truncatingIfNeeded: offset), new: UInt16(truncatingIfNeeded: nextUsed),
                                     old: UInt16(truncatingIfNeeded: previous))
    }

    // MARK: Driver notifications (kicks)

    @inlinable public mutating func disableNotifications() {
        deviceEvent.storeBytes(of: EventFlags.disable.littleEndian, toByteOffset: 2, as: UInt16.self)
    }

    @inlinable public mutating func enableNotifications() throws(VirtqueueError) -> Bool {
        if features.eventIndex {
            let offWrap = UInt16(nextAvail) | (availWrap ? 0x8000 : 0)
            deviceEvent.storeBytes(of: offWrap.littleEndian, as: UInt16.self)
            deviceEvent.storeBytes(of: EventFlags.descriptor.littleEndian, toByteOffset: 2, as: UInt16.self)
        } else {
            deviceEvent.storeBytes(of: EventFlags.enable.littleEndian, toByteOffset: 2, as: UInt16.self)
        }
        cvs_fence_seq_cst()
        return isAvailable(flags(at: nextAvail), wrap: availWrap)
    }

    public func markDeviceWrites(in log: DirtyLog) {
        if let descriptorsGuestAddress { log.mark(descriptorsGuestAddress, length: UInt64(16 * size)) }
        if let deviceEventGuestAddress { log.mark(deviceEventGuestAddress, length: 4) }
    }
}
