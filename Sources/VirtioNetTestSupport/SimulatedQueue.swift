import CVirtioShim
import GuestMemory
import Virtqueue

/// The driver's side of one split virtqueue, laid out in simulated guest memory.
/// It follows the spec like a well-behaved driver, and can also write malicious rings on purpose.
public final class SimulatedQueue: @unchecked Sendable {
    public let guest: SimulatedGuestMemory
    public let size: Int
    public let descriptorTable: GuestAddress
    public let availableRing: GuestAddress
    public let usedRing: GuestAddress
    public var eventIndex: Bool

    public private(set) var availableIndex: UInt16 = 0
    public private(set) var lastSeenUsed: UInt16 = 0
    /// Used entries already recycled by `recycleUsed()` (which bypasses `takeUsed()`).
    var lastSeenUsedForRecycling: UInt16 = 0
    private var free: [UInt16]
    /// Descriptors owned by each outstanding head (to free them when used).
    private var owned: [UInt16: [UInt16]] = [:]
    /// The writable buffers of each outstanding receive chain, to read data back.
    public private(set) var buffers: [UInt16: [(GuestAddress, UInt32)]] = [:]

    public init(guest: SimulatedGuestMemory, size: Int, eventIndex: Bool) {
        self.guest = guest
        self.size = size
        self.eventIndex = eventIndex
        descriptorTable = guest.allocate(16 * size, alignment: 16)
        availableRing = guest.allocate(6 + 2 * size, alignment: 2)
        usedRing = guest.allocate(6 + 8 * size, alignment: 4)
        free = (0..<UInt16(truncatingIfNeeded: size)).reversed()
        guest.write([UInt8](repeating: 0, count: 16 * size), at: descriptorTable)
        guest.write([UInt8](repeating: 0, count: 6 + 2 * size), at: availableRing)
        guest.write([UInt8](repeating: 0, count: 6 + 8 * size), at: usedRing)
    }

    public var rings: RingAddresses {
        .guestPhysical(descriptorTable: descriptorTable, availableRing: availableRing, usedRing: usedRing)
    }

    public var frontendRings: RingAddresses {
        .frontendVirtual(descriptorTable: guest.userAddress(of: descriptorTable),
                         availableRing: guest.userAddress(of: availableRing), usedRing: guest.userAddress(of: usedRing))
    }

    public var freeDescriptors: Int { free.count }

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

    /// Adds a chain of buffers (readable ones first, as the spec asks) and makes it available.
    /// With `indirect`, one descriptor points at a table holding the chain. Returns the head, or nil
    /// when the ring has no free descriptors.
    @discardableResult
    public func add(_ segments: [(address: GuestAddress, length: UInt32, writable: Bool)], indirect: Bool = false, publish: Bool = true) -> UInt16? {
        let needed = indirect ? 1 : segments.count
        guard needed > 0, free.count >= needed else { return nil }
        let head: UInt16
        if indirect {
            let table = guest.allocate(16 * segments.count, alignment: 16)
            for (position, segment) in segments.enumerated() {
                let last = position == segments.count - 1
                writeDescriptor(position, address: segment.address.rawValue, length: segment.length,
                                flags: (last ? 0 : Self.flagNext) | (segment.writable ? Self.flagWrite : 0),
                                next: last ? 0 : UInt16(position + 1), table: table)
            }
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
    }

    /// Puts `head` in the available ring (without any checks: malicious tests use this directly).
    public func makeAvailable(head: UInt16, publish: Bool = true) {
        let slot = Int(availableIndex) % size
        guest.store(head, at: GuestAddress(availableRing.rawValue + 4 + UInt64(2 * slot)))
        availableIndex &+= 1
        if publish { publishAvailable() }
    }

    /// Stores avail.idx with release ordering, as the driver's memory barrier before it.
    public func publishAvailable() {
        let pointer = try! guest.memory.hostPointer(GuestAddress(availableRing.rawValue + 2), length: 2)
        cvs_store_release_u16(pointer, availableIndex.littleEndian)
    }

    /// Writes any avail.idx (for hostile tests).
    public func setAvailableIndex(_ value: UInt16) {
        availableIndex = value
        publishAvailable()
    }

    /// Tells the device not to interrupt (flags, or used_event with event idx).
    public func setNoInterrupt(_ on: Bool) {
        guest.store(UInt16(on ? 1 : 0), at: availableRing)
    }

    /// VIRTIO_RING_F_EVENT_IDX: interrupt me when used.idx passes `index`.
    public func setUsedEvent(_ index: UInt16) {
        guest.store(index, at: GuestAddress(availableRing.rawValue + 4 + UInt64(2 * size)))
    }

    /// Whether the driver must kick after adding buffers from `oldIndex` to the current index.
    public func needsKick(since oldIndex: UInt16) -> Bool {
        cvs_fence_seq_cst()
        if eventIndex {
            let availEvent: UInt16 = guest.load(UInt16.self, at: GuestAddress(usedRing.rawValue + 4 + UInt64(8 * size)))
            return SplitQueue.needsEvent(eventIndex: availEvent, new: availableIndex, old: oldIndex)
        }
        return guest.load(UInt16.self, at: usedRing) & 1 == 0
    }

    public var usedIndex: UInt16 {
        let pointer = try! guest.memory.hostPointer(GuestAddress(usedRing.rawValue + 2), length: 2)
        return UInt16(littleEndian: cvs_load_acquire_u16(pointer))
    }

    /// Takes the used entries the device published since the last call, freeing their descriptors.
    public func takeUsed() -> [(head: UInt16, length: UInt32)] {
        let published = usedIndex
        var result: [(UInt16, UInt32)] = []
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
        return result
    }

    /// Forgets a head the test made available by hand (malicious chains) so its descriptors return.
    public func forget(head: UInt16) {
        if let descriptors = owned.removeValue(forKey: head) { free.append(contentsOf: descriptors) }
    }

    /// Claims specific descriptors for a hand-written chain.
    public func claim(_ indices: [UInt16]) -> Bool {
        guard indices.allSatisfy(free.contains) else { return false }
        free.removeAll { indices.contains($0) }
        owned[indices[0]] = indices
        return true
    }
}
