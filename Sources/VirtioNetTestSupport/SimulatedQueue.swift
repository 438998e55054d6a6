import CVirtioShim
import GuestMemory
import Virtqueue

/// The driver's side of one virtqueue, split or packed, laid out in simulated guest memory.
/// It follows the spec like a well-behaved driver, and can also write malicious rings on purpose.
///
/// Both layouts share one interface: a chain is named by its head (split: the head descriptor;
/// packed: its buffer id), `availableIndex` counts what was made available (split: chains, as
/// avail.idx; packed: ring slots) and `usedIndex` what the device used, in the same unit.
public final class SimulatedQueue: @unchecked Sendable {
    public enum Layout: Sendable { case split, packed }

    public let guest: SimulatedGuestMemory
    public let size: Int
    public let layout: Layout
    /// Split: the descriptor table. Packed: the descriptor ring.
    public let descriptorTable: GuestAddress
    /// Split: the available ring. Packed: the driver event suppression area.
    public let availableRing: GuestAddress
    /// Split: the used ring. Packed: the device event suppression area.
    public let usedRing: GuestAddress
    public var eventIndex: Bool

    public internal(set) var availableIndex: UInt16 = 0
    public internal(set) var lastSeenUsed: UInt16 = 0
    /// Used entries already recycled by `recycleUsed()` (which bypasses `takeUsed()`).
    var lastSeenUsedForRecycling: UInt16 = 0
    private var free: [UInt16]
    /// Descriptors owned by each outstanding head (to free them when used); packed: its ring slots.
    private var owned: [UInt16: [UInt16]] = [:]
    /// The writable buffers of each outstanding receive chain, to read data back.
    public private(set) var buffers: [UInt16: [(GuestAddress, UInt32)]] = [:]

    // Packed ring state (virtio 1.2, 2.8): where the driver writes next and reads used next, with
    // their wrap counters; chains added and not yet published (their first flags are written last).
    public internal(set) var nextAvailablePosition = 0
    public internal(set) var availableWrap = true
    public internal(set) var nextUsedPosition = 0
    public internal(set) var usedWrap = true
    private var unpublishedHeads: [(position: Int, flags: UInt16)] = []
    /// Each buffer id's chain as made available, for `recycleUsed()`.
    var packedChains: [[(address: UInt64, length: UInt32, flags: UInt16)]]

    public init(guest: SimulatedGuestMemory, size: Int, eventIndex: Bool, layout: Layout = .split) {
        self.guest = guest
        self.size = size
        self.layout = layout
        self.eventIndex = eventIndex
        switch layout {
        case .split:
            descriptorTable = guest.allocate(16 * size, alignment: 16)
            availableRing = guest.allocate(6 + 2 * size, alignment: 2)
            usedRing = guest.allocate(6 + 8 * size, alignment: 4)
            guest.write([UInt8](repeating: 0, count: 6 + 2 * size), at: availableRing)
            guest.write([UInt8](repeating: 0, count: 6 + 8 * size), at: usedRing)
        case .packed:
            descriptorTable = guest.allocate(16 * size, alignment: 16)
            availableRing = guest.allocate(4, alignment: 4)
            usedRing = guest.allocate(4, alignment: 4)
            guest.write([0, 0, 0, 0], at: availableRing)
            guest.write([0, 0, 0, 0], at: usedRing)
        }
        guest.write([UInt8](repeating: 0, count: 16 * size), at: descriptorTable)
        free = (0..<UInt16(truncatingIfNeeded: size)).reversed()
        packedChains = layout == .packed ? Array(repeating: [], count: size) : []
    }

    public var rings: RingAddresses {
        .guestPhysical(descriptorTable: descriptorTable, availableRing: availableRing, usedRing: usedRing)
    }

    public var frontendRings: RingAddresses {
        .frontendVirtual(descriptorTable: guest.userAddress(of: descriptorTable),
                         availableRing: guest.userAddress(of: availableRing), usedRing: guest.userAddress(of: usedRing))
    }

    /// Split: free descriptors. Packed: free ring slots.
    public var freeDescriptors: Int {
        layout == .split ? free.count : size - owned.values.reduce(0) { $0 + $1.count }
    }

    public func writeDescriptor(_ index: Int, address: UInt64, length: UInt32, flags: UInt16, next: UInt16, table: GuestAddress? = nil) {
        let entry = GuestAddress((table ?? descriptorTable).rawValue + UInt64(16 * index))
        guest.store(address, at: entry)
        guest.store(length, at: GuestAddress(entry.rawValue + 8))
        guest.store(flags, at: GuestAddress(entry.rawValue + 12))
        guest.store(next, at: GuestAddress(entry.rawValue + 14))
    }

    public static let flagNext: UInt16 = 1
    public static let flagWrite: UInt16 = 2
    public static let flagIndirect: UInt16 = 4
    /// Packed ring descriptor flags.
    public static let flagAvailable: UInt16 = 1 << 7
    public static let flagUsed: UInt16 = 1 << 15

    /// Adds a chain of buffers (readable ones first, as the spec asks) and makes it available.
    /// With `indirect`, one descriptor points at a table holding the chain. Returns the head (packed:
    /// the buffer id), or nil when the ring has no room.
    @discardableResult
    public func add(_ segments: [(address: GuestAddress, length: UInt32, writable: Bool)], indirect: Bool = false, publish: Bool = true) -> UInt16? {
        let needed = indirect ? 1 : segments.count
        guard needed > 0 else { return nil }
        var table: GuestAddress? = nil
        if indirect {
            let allocated = guest.allocate(16 * segments.count, alignment: 16)
            for (position, segment) in segments.enumerated() {
                let last = position == segments.count - 1
                if layout == .packed {
                    // A packed indirect table holds packed descriptors, of which only WRITE counts.
                    writePackedDescriptor(position, address: segment.address.rawValue, length: segment.length, id: 0,
                                          flags: segment.writable ? Self.flagWrite : 0, table: allocated)
                } else {
                    writeDescriptor(position, address: segment.address.rawValue, length: segment.length,
                                    flags: (last ? 0 : Self.flagNext) | (segment.writable ? Self.flagWrite : 0),
                                    next: last ? 0 : UInt16(position + 1), table: allocated)
                }
            }
            table = allocated
        }
        switch layout {
        case .split:
            guard free.count >= needed else { return nil }
            let head: UInt16
            if let table {
                head = free.removeLast()
                writeDescriptor(Int(head), address: table.rawValue, length: UInt32(16 * segments.count), flags: Self.flagIndirect, next: 0)
                owned[head] = [head]
            } else {
                let indices = (0..<segments.count).map { _ in free.removeLast() }
                for (position, segment) in segments.enumerated() {
                    let last = position == segments.count - 1
                    writeDescriptor(Int(indices[position]), address: segment.address.rawValue, length: segment.length,
                                    flags: (last ? 0 : Self.flagNext) | (segment.writable ? Self.flagWrite : 0),
                                    next: last ? 0 : indices[position + 1])
                }
                head = indices[0]
                owned[head] = indices
            }
            buffers[head] = segments.filter(\.writable).map { ($0.address, $0.length) }
            makeAvailable(head: head, publish: publish)
            return head
        case .packed:
            guard freeDescriptors >= needed, let id = free.popLast() else { return nil }
            let chain: [(address: UInt64, length: UInt32, flags: UInt16)]
            if let table {
                chain = [(table.rawValue, UInt32(16 * segments.count), Self.flagIndirect)]
            } else {
                chain = segments.enumerated().map { position, segment in
                    (segment.address.rawValue, segment.length,
                     (position == segments.count - 1 ? 0 : Self.flagNext) | (segment.writable ? Self.flagWrite : 0))
                }
            }
            packedChains[Int(id)] = chain
            addPacked(id: id, chain: chain)
            buffers[id] = segments.filter(\.writable).map { ($0.address, $0.length) }
            if publish { publishAvailable() }
            return id
        }
    }

    /// Writes a packed chain at the next available slots, its first flags held until publication.
    private func addPacked(id: UInt16, chain: [(address: UInt64, length: UInt32, flags: UInt16)]) {
        var slots: [UInt16] = []
        for (position, descriptor) in chain.enumerated() {
            let flags = descriptor.flags | (availableWrap ? Self.flagAvailable : Self.flagUsed)
            slots.append(UInt16(nextAvailablePosition))
            writePackedDescriptor(nextAvailablePosition, address: descriptor.address, length: descriptor.length, id: id,
                                  flags: position == 0 ? nil : flags)
            if position == 0 { unpublishedHeads.append((nextAvailablePosition, flags)) }
            nextAvailablePosition += 1
            if nextAvailablePosition == size {
                nextAvailablePosition = 0
                availableWrap.toggle()
            }
        }
        owned[id] = slots
        availableIndex &+= UInt16(chain.count)
    }

    /// Writes one packed descriptor, in the ring or in an indirect `table`; its flags (in the ring with
    /// release ordering) unless nil.
    public func writePackedDescriptor(_ position: Int, address: UInt64, length: UInt32, id: UInt16, flags: UInt16?,
                                      table: GuestAddress? = nil) {
        let entry = GuestAddress((table ?? descriptorTable).rawValue + UInt64(16 * position))
        guest.store(address, at: entry)
        guest.store(length, at: GuestAddress(entry.rawValue + 8))
        guest.store(id, at: GuestAddress(entry.rawValue + 12))
        guard let flags else { return }
        if table != nil { guest.store(flags, at: GuestAddress(entry.rawValue + 14)) } else { storePackedFlags(flags, at: position) }
    }

    /// The flags of packed descriptor `position`, stored with release ordering (the driver's barrier).
    public func storePackedFlags(_ flags: UInt16, at position: Int) {
        let pointer = try! guest.memory.hostPointer(GuestAddress(descriptorTable.rawValue + UInt64(16 * position) + 14), length: 2)
        cvs_store_release_u16(pointer, flags.littleEndian)
    }

    func advancePackedAvailable() {
        nextAvailablePosition += 1
        availableIndex &+= 1
        if nextAvailablePosition == size { nextAvailablePosition = 0; availableWrap.toggle() }
    }

    func advancePackedUsed(by slots: Int) {
        lastSeenUsed &+= UInt16(slots)
        nextUsedPosition += slots
        if nextUsedPosition >= size { nextUsedPosition -= size; usedWrap.toggle() }
    }

    /// The flags a packed descriptor made available now carries (AVAIL = wrap, USED = !wrap).
    public var packedAvailableFlags: UInt16 { availableWrap ? Self.flagAvailable : Self.flagUsed }

    /// Puts `head` in the available ring (split; without any checks: malicious tests use this directly).
    public func makeAvailable(head: UInt16, publish: Bool = true) {
        precondition(layout == .split)
        let slot = Int(availableIndex) % size
        guest.store(head, at: GuestAddress(availableRing.rawValue + 4 + UInt64(2 * slot)))
        availableIndex &+= 1
        if publish { publishAvailable() }
    }

    /// Makes what was added visible to the device at once: split, avail.idx with release ordering;
    /// packed, each unpublished chain's first flags, the earliest last.
    public func publishAvailable() {
        switch layout {
        case .split:
            let pointer = try! guest.memory.hostPointer(GuestAddress(availableRing.rawValue + 2), length: 2)
            cvs_store_release_u16(pointer, availableIndex.littleEndian)
        case .packed:
            for head in unpublishedHeads.reversed() { storePackedFlags(head.flags, at: head.position) }
            unpublishedHeads.removeAll(keepingCapacity: true)
        }
    }

    /// Writes any avail.idx (split; for hostile tests).
    public func setAvailableIndex(_ value: UInt16) {
        availableIndex = value
        publishAvailable()
    }

    /// Tells the device not to interrupt (split: the flag; packed: the driver area's flags), or to.
    public func setNoInterrupt(_ on: Bool) {
        switch layout {
        case .split: guest.store(UInt16(on ? 1 : 0), at: availableRing)
        case .packed: guest.store(UInt16(on ? 1 : 0), at: GuestAddress(availableRing.rawValue + 2))
        }
    }

    /// VIRTIO_RING_F_EVENT_IDX: interrupt me when the used index passes `index` (split: used.idx;
    /// packed: the used slot count, as `usedIndex` counts).
    public func setUsedEvent(_ index: UInt16) {
        switch layout {
        case .split:
            guest.store(index, at: GuestAddress(availableRing.rawValue + 4 + UInt64(2 * size)))
        case .packed:
            // The slot after which to interrupt, as a ring offset and the wrap counter it will carry.
            let ahead = Int(index &- lastSeenUsed)
            var position = nextUsedPosition + ahead, wrap = usedWrap
            while position >= size { position -= size; wrap.toggle() }
            guest.store(UInt16(position) | (wrap ? 0x8000 : 0), at: availableRing)
            guest.store(UInt16(2), at: GuestAddress(availableRing.rawValue + 2))
        }
    }

    /// Whether the driver must kick after adding buffers from `oldIndex` to the current index.
    public func needsKick(since oldIndex: UInt16) -> Bool {
        cvs_fence_seq_cst()
        switch layout {
        case .split:
            if eventIndex {
                let availEvent: UInt16 = guest.load(UInt16.self, at: GuestAddress(usedRing.rawValue + 4 + UInt64(8 * size)))
                return SplitQueue.needsEvent(eventIndex: availEvent, new: availableIndex, old: oldIndex)
            }
            return guest.load(UInt16.self, at: usedRing) & 1 == 0
        case .packed:
            let flags: UInt16 = guest.load(UInt16.self, at: GuestAddress(usedRing.rawValue + 2)) & 3
            guard flags == 2 else { return flags == 0 }
            // As Linux does: positions in the ring, the previous lap below 0.
            let offWrap: UInt16 = guest.load(UInt16.self, at: usedRing)
            var event = Int(offWrap & 0x7fff)
            if (offWrap & 0x8000 != 0) != availableWrap { event -= size }
            let new = nextAvailablePosition
            let old = new - Int(availableIndex &- oldIndex)
            return SplitQueue.needsEvent(eventIndex: UInt16(truncatingIfNeeded: event), new: UInt16(truncatingIfNeeded: new),
                                         old: UInt16(truncatingIfNeeded: old))
        }
    }

    /// What the device has used: split, used.idx; packed, the ring slots of the used chains seen so
    /// far plus those published and not yet taken.
    public var usedIndex: UInt16 {
        switch layout {
        case .split:
            let pointer = try! guest.memory.hostPointer(GuestAddress(usedRing.rawValue + 2), length: 2)
            return UInt16(littleEndian: cvs_load_acquire_u16(pointer))
        case .packed:
            var index = lastSeenUsed, position = nextUsedPosition, wrap = usedWrap
            while let (id, _) = packedUsed(at: position, wrap: wrap) {
                let slots = owned[id]?.count ?? 1
                index &+= UInt16(slots)
                position += slots
                if position >= size { position -= size; wrap.toggle() }
            }
            return index
        }
    }

    /// The used descriptor at `position`, if the device has written one there for lap `wrap`.
    private func packedUsed(at position: Int, wrap: Bool) -> (id: UInt16, length: UInt32)? {
        let entry = GuestAddress(descriptorTable.rawValue + UInt64(16 * position))
        let pointer = try! guest.memory.hostPointer(GuestAddress(entry.rawValue + 14), length: 2)
        let flags = UInt16(littleEndian: cvs_load_acquire_u16(pointer))
        guard (flags & Self.flagAvailable != 0) == wrap, (flags & Self.flagUsed != 0) == wrap else { return nil }
        return (guest.load(UInt16.self, at: GuestAddress(entry.rawValue + 12)), guest.load(UInt32.self, at: GuestAddress(entry.rawValue + 8)))
    }

    /// Takes the used entries the device published since the last call, freeing their descriptors.
    public func takeUsed() -> [(head: UInt16, length: UInt32)] {
        var result: [(UInt16, UInt32)] = []
        switch layout {
        case .split:
            let published = usedIndex
            while lastSeenUsed != published {
                let slot = Int(lastSeenUsed) % size
                let element = GuestAddress(usedRing.rawValue + 4 + UInt64(8 * slot))
                let id = guest.load(UInt32.self, at: element)
                let length = guest.load(UInt32.self, at: GuestAddress(element.rawValue + 4))
                let head = UInt16(truncatingIfNeeded: id)
                if let descriptors = owned.removeValue(forKey: head) { free.append(contentsOf: descriptors) }
                result.append((head, length))
                lastSeenUsed &+= 1
            }
        case .packed:
            while let (id, length) = packedUsed(at: nextUsedPosition, wrap: usedWrap) {
                // A well-behaved device names only ids it was given; count one slot for any other.
                let slots = owned.removeValue(forKey: id)?.count ?? 1
                if slots > 0, id < size, !free.contains(id) { free.append(id) }
                result.append((id, length))
                lastSeenUsed &+= UInt16(slots)
                nextUsedPosition += slots
                if nextUsedPosition >= size { nextUsedPosition -= size; usedWrap.toggle() }
            }
        }
        return result
    }

    /// Forgets a head the test made available by hand (malicious chains) so its descriptors return.
    public func forget(head: UInt16) {
        if let descriptors = owned.removeValue(forKey: head) {
            if layout == .split { free.append(contentsOf: descriptors) } else { free.append(head) }
        }
    }

    /// Claims specific descriptors for a hand-written chain (split).
    public func claim(_ indices: [UInt16]) -> Bool {
        guard indices.allSatisfy(free.contains) else { return false }
        free.removeAll { indices.contains($0) }
        owned[indices[0]] = indices
        return true
    }

    /// Packed: takes slots for a hand-written chain of `slots` descriptors with buffer `id`, and
    /// returns the positions and the flags an available descriptor carries at each (wrap counters
    /// change at the ring's end). The caller writes the descriptors.
    public func claimPacked(id: UInt16, slots: Int) -> [(position: Int, availableFlags: UInt16)] {
        free.removeAll { $0 == id }
        var claimed: [(Int, UInt16)] = []
        for _ in 0..<slots {
            claimed.append((nextAvailablePosition, packedAvailableFlags))
            nextAvailablePosition += 1
            if nextAvailablePosition == size { nextAvailablePosition = 0; availableWrap.toggle() }
        }
        owned[id] = claimed.map { UInt16($0.0) }
        availableIndex &+= UInt16(slots)
        return claimed
    }
}
