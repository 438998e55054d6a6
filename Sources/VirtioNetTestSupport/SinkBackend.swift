#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import GuestMemory
import Synchronization
import Sys
import VirtioNet

/// A backend that costs as little as possible, to measure the device alone: transmitted frames are
/// counted and forgotten; receive hands out copies of one template frame (or nothing). It never
/// allocates per frame.
public final class SinkBackend: PacketBackend, @unchecked Sendable {
    public let queuePairs: Int
    public let receiveOffloads: OffloadSet = .all
    public let transmitOffloads: OffloadSet = .all
    /// Frames and bytes transmitted (only the owning worker writes them).
    @exclusivity(unchecked) public private(set) var transmittedFrames = 0
    @exclusivity(unchecked) public private(set) var transmittedBytes = 0
    /// What `receive` returns: header + frame; empty means "nothing to receive".
    private let template: UnsafeMutableRawBufferPointer
    /// How many more frames `receive` hands out before it reports "empty".
    public var receiveQuota: Int
    private let readiness: [EventFD]

    public init(queuePairs: Int = 1, receiveFrame: [UInt8] = [], receiveQuota: Int = 0) throws(SystemError) {
        self.queuePairs = queuePairs
        template = .allocate(byteCount: max(receiveFrame.count, 1), alignment: 16)
        template.copyBytes(from: receiveFrame)
        self.templateLength = receiveFrame.count
        self.receiveQuota = receiveQuota
        var events: [EventFD] = []
        for _ in 0..<queuePairs {
            let event = try EventFD()
            try event.signal()  // always readable: receive decides whether there is a frame
            events.append(event)
        }
        readiness = events
    }
    private let templateLength: Int

    deinit { template.deallocate() }

    public func setReceiveOffloads(_ offloads: OffloadSet) throws(BackendError) {}
    public func setActiveQueuePairs(_ count: Int) throws(BackendError) {}

    public func transmit(queue: Int, frame: UnsafeBufferPointer<iovec>) -> TransmitOutcome {
        transmittedFrames += 1
        transmittedBytes += IOVec.totalLength(frame)
        return .sent
    }

    public func receive(queue: Int, into buffers: UnsafeBufferPointer<iovec>) -> ReceiveOutcome {
        guard receiveQuota > 0, templateLength > 0 else { return .empty }
        receiveQuota -= 1
        let copied = IOVec.copyIn(UnsafeRawBufferPointer(rebasing: template[0..<templateLength]), to: buffers, at: 0)
        return .received(bytes: copied)
    }

    public func descriptor(queue: Int) -> Int32 { readiness[queue].rawValue }
}

extension SimulatedQueue {
    /// Makes every chain the device has used available again, as it was (same descriptors): a driver
    /// that recycles its buffers, without allocating. Returns how many were recycled.
    @discardableResult
    public func recycleUsed() -> Int {
        if layout == .packed { return recyclePackedUsed() }
        // Concrete, pointer-level loads and stores: the benchmarks measure the device, not this.
        let used = try! guest.memory.hostPointer(usedRing, length: UInt64(6 + 8 * size))
        let available = try! guest.memory.hostPointer(availableRing, length: UInt64(6 + 2 * size))
        let published = UInt16(littleEndian: cvs_load_acquire_u16(used + 2))
        var count = 0
        var seen = lastSeenUsedForRecycling
        var next = availableIndex
        while seen != published {
            let head = UInt16(truncatingIfNeeded: UInt32(littleEndian: (used + 4 + 8 * (Int(seen) % size)).loadUnaligned(as: UInt32.self)))
            (available + 4 + 2 * (Int(next) % size)).storeBytes(of: head.littleEndian, as: UInt16.self)
            next &+= 1
            seen &+= 1
            count += 1
        }
        lastSeenUsedForRecycling = seen
        if count > 0 { setAvailableIndex(next) }
        return count
    }

    /// The packed form: each used chain is written again at the next available slots (the same
    /// buffers, the same id), the batch published with its first flags last.
    private func recyclePackedUsed() -> Int {
        let ring = try! guest.memory.hostPointer(descriptorTable, length: UInt64(16 * size))
        var count = 0
        var firstPosition = -1
        var firstFlags: UInt16 = 0
        while true {
            let entry = ring + 16 * nextUsedPosition
            let flags = UInt16(littleEndian: cvs_load_acquire_u16(entry + 14))
            guard (flags & Self.flagAvailable != 0) == usedWrap, (flags & Self.flagUsed != 0) == usedWrap else { break }
            let id = Int(UInt16(littleEndian: entry.loadUnaligned(fromByteOffset: 12, as: UInt16.self)))
            let chain = packedChains[id]
            for descriptor in chain {
                let slot = ring + 16 * nextAvailablePosition
                slot.storeBytes(of: descriptor.address.littleEndian, as: UInt64.self)
                slot.storeBytes(of: descriptor.length.littleEndian, toByteOffset: 8, as: UInt32.self)
                slot.storeBytes(of: UInt16(id).littleEndian, toByteOffset: 12, as: UInt16.self)
                let available = descriptor.flags | packedAvailableFlags
                if firstPosition < 0 {
                    firstPosition = nextAvailablePosition
                    firstFlags = available
                } else {
                    cvs_store_release_u16(slot + 14, available.littleEndian)
                }
                advancePackedAvailable()
            }
            advancePackedUsed(by: chain.count)
            count += 1
        }
        if firstPosition >= 0 { cvs_store_release_u16(ring + 16 * firstPosition + 14, firstFlags.littleEndian) }
        return count
    }
}
