import GuestMemory
import Logging
import Testing
@testable import VirtioNet
import VirtioNetTestSupport
import Virtqueue

/// A device-side packed queue over a driver-side ring, for writing malicious chains by hand.
private final class HostilePackedRing {
    let guest: SimulatedGuestMemory
    let driver: SimulatedQueue
    var device: PackedQueue
    var iovecs = IOVecArray(capacity: 64)

    init(size: Int = 16, indirect: Bool = true, eventIndex: Bool = false,
         maximumChainLength: UInt32 = SplitQueue.defaultMaximumChainLength) throws {
        guest = try SimulatedGuestMemory(regionSize: 1 << 20)
        driver = SimulatedQueue(guest: guest, size: size, eventIndex: eventIndex, layout: .packed)
        guest.sealRingArea()
        device = try PackedQueue(memory: guest.memory, size: size, rings: driver.rings,
                                 features: RingFeatures(eventIndex: eventIndex, indirectDescriptors: indirect),
                                 maximumChainLength: maximumChainLength)
    }

    func buffer(_ length: Int) -> UInt64 { guest.allocate(length).rawValue }

    /// Writes a chain by hand at the driver's next slots: each descriptor's flags as given plus the
    /// AVAIL/USED bits of its lap, the first one's last. Returns the slots' positions.
    @discardableResult
    func write(id: UInt16, _ descriptors: [(address: UInt64, length: UInt32, flags: UInt16)]) -> [Int] {
        let slots = driver.claimPacked(id: id, slots: descriptors.count)
        for (index, descriptor) in descriptors.enumerated().reversed() {
            driver.writePackedDescriptor(slots[index].position, address: descriptor.address, length: descriptor.length, id: id,
                                         flags: descriptor.flags | slots[index].availableFlags)
        }
        return slots.map(\.position)
    }

    func pop() -> Result<DescriptorChain?, VirtqueueError> {
        iovecs.removeAll()
        do throws(VirtqueueError) { return .success(try device.popChain(into: &iovecs)) } catch { return .failure(error) }
    }

    func expectBadChain(_ result: Result<DescriptorChain?, VirtqueueError>, id: UInt16, slots: UInt16, _ fault: ChainFault,
                        sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(result == .failure(.badChain(head: ChainHead(id: id, slots: slots), fault)), sourceLocation: sourceLocation)
        #expect(iovecs.count == 0, "nothing of a refused chain is handed out", sourceLocation: sourceLocation)
    }

    /// Gives the bad chain back and checks the driver sees it used with length 0 and its id.
    func expectGivenBack(id: UInt16, slots: UInt16, sourceLocation: SourceLocation = #_sourceLocation) {
        device.addUsed(head: ChainHead(id: id, slots: slots), length: 0)
        device.publishUsed()
        let used = driver.takeUsed()
        #expect(used.map(\.head) == [id] && used.map(\.length) == [0], sourceLocation: sourceLocation)
    }
}

private let next = SimulatedQueue.flagNext
private let write = SimulatedQueue.flagWrite
private let indirect = SimulatedQueue.flagIndirect

@Suite("Packed rings: chains, wrap counters, event suppression and hostile drivers")
struct PackedRingTests {
    // MARK: Through the whole device

    @Test("Frames round-trip through a ring of 8 for many laps: wrap counters flip, chains straddle the ring's end",
          arguments: [false, true], [false, true])
    func manyLaps(mergeable: Bool, useIndirect: Bool) throws {
        let (device, driver, _) = try makeLoopbackDevice(mtu: 9000, without: mergeable ? [] : [.mergeableRxBuffers],
                                                         queueSize: 8, layout: .packed)
        driver.useIndirect = useIndirect
        for number in 0..<40 {
            let size = [60, 1514, 3000, 9014][number % 4]
            // Mergeable: 4 KiB buffers of 2 descriptors each; otherwise one buffer of 3 descriptors.
            if mergeable {
                driver.postReceiveBuffers(count: (size + 12 + 4095) / 4096, size: 4096, segments: 2)
            } else {
                driver.postReceiveBuffers(count: 1, size: 9100, segments: useIndirect ? 5 : 3)
            }
            let frame = ethernetFrame(length: size, seed: UInt8(number))
            let added = driver.transmit(frame, segmentSize: size > 2000 ? 2000 : nil)
            #expect(added, "frame \(number) of \(size) bytes")
            let received = driver.receive(count: 1)
            try #require(received.count == 1, "frame \(number) of \(size) bytes did not come back")
            let intact = received[0].frame == frame
            #expect(intact, "frame \(number) changed on the way")
            #expect(driver.completedTransmits().count == 1)
        }
        let rx = device.queuePairCounters[0].receive.snapshot, tx = device.queuePairCounters[0].transmit.snapshot
        #expect(rx.frames == 40 && tx.frames == 40)
        #expect(rx.drops.values.allSatisfy { $0 == 0 } && tx.drops.values.allSatisfy { $0 == 0 })
    }

    @Test("A device reset in mid-traffic resumes at the saved base, wrap counters included, many laps in", arguments: [1, 3, 7])
    func resumeAtSavedBase(frames: Int) throws {
        let (device, driver, backend) = try makeLoopbackDevice(queueSize: 8, layout: .packed)
        for round in 0..<4 {
            for number in 0..<frames {
                driver.postReceiveBuffers(count: 1, size: 2048)
                let frame = ethernetFrame(length: 100 + number, seed: UInt8(round))
                #expect(driver.transmit(frame))
                let intact = driver.receive(count: 1).map(\.frame) == [frame]
                #expect(intact, "round \(round) frame \(number)")
                _ = driver.completedTransmits()
            }
            let states = device.reset()
            #expect(states.count == 3)
            for state in states where state.index < 2 {
                let queue = state.index == 0 ? driver.receiveQueues[0] : driver.transmitQueues[0]
                // Everything was used: the used position is the available one, in both halves.
                let expected = UInt32(queue.nextAvailablePosition) | (queue.availableWrap ? 0x8000 : 0)
                #expect(state.base == expected | expected << 16, "ring \(state.index) round \(round)")
            }
            try device.acknowledge(features: driver.features)
            try device.activate(memory: driver.guest.memory, queues: states.map { state in
                let queue = state.index == 0 ? driver.receiveQueues[0] : state.index == 1 ? driver.transmitQueues[0] : driver.controlQueue!
                return QueueConfiguration(index: state.index, size: queue.size, rings: queue.rings, base: state.base)
            }, drive: .manual)
        }
        #expect(backend.pendingFrames(queue: 0) == 0)
    }

    @Test("Buffer ids are the driver's: out-of-range and repeated ids are given back as they came")
    func idsAreEchoed() throws {
        let ring = try HostilePackedRing()
        let data = ring.buffer(64)
        ring.write(id: 0xffff, [(data, 64, 0)])
        ring.write(id: 0xffff, [(data, 64, 0)])
        ring.write(id: 3, [(data, 32, next), (data, 32, 0)])
        var heads: [ChainHead] = []
        for _ in 0..<3 {
            guard case let .success(chain?) = ring.pop() else { Issue.record("chain not popped"); return }
            heads.append(chain.head)
        }
        #expect(heads == [ChainHead(id: 0xffff), ChainHead(id: 0xffff), ChainHead(id: 3, slots: 2)])
        for head in heads { ring.device.addUsed(head: head, length: 0) }
        ring.device.publishUsed()
        #expect(ring.driver.takeUsed().map(\.head) == [0xffff, 0xffff, 3])
        #expect(ring.device.base == 0x8004_8004)
    }

    // MARK: Hostile chains

    @Test("A chain longer than the ring has no end: the queue is broken and nothing is consumed")
    func chainLongerThanTheRing() throws {
        let ring = try HostilePackedRing(size: 8)
        let data = ring.buffer(64)
        // Every slot available and linked: the walk comes back to the start, still NEXT.
        ring.write(id: 1, Array(repeating: (data, 64, next), count: 8))
        #expect(ring.pop() == .failure(.broken(.chainWithoutEnd)))
        #expect(ring.device.base == PackedQueue.freshBase, "nothing consumed")
    }

    @Test("A chain whose middle descriptor is not available (its wrap counter lies) is broken, not waited on")
    func middleDescriptorNotAvailable() throws {
        let ring = try HostilePackedRing(size: 8)
        let data = ring.buffer(64)
        let slots = ring.write(id: 1, [(data, 64, next), (data, 64, next), (data, 64, 0)])
        // The second descriptor claims the previous lap.
        ring.driver.storePackedFlags(next | SimulatedQueue.flagUsed, at: slots[1])
        #expect(ring.pop() == .failure(.broken(.chainWithoutEnd)))
        #expect(ring.device.base == PackedQueue.freshBase)
    }

    @Test("Heads that look used or belong to another lap are not available: the device waits", arguments: [
        SimulatedQueue.flagAvailable | SimulatedQueue.flagUsed, 0, SimulatedQueue.flagUsed,
    ])
    func headFromAnotherLap(flags: UInt16) throws {
        let ring = try HostilePackedRing(size: 8)
        ring.driver.writePackedDescriptor(0, address: ring.buffer(64), length: 64, id: 1, flags: flags)
        #expect(ring.pop() == .success(nil))
    }

    @Test("Addresses that overflow or leave guest memory make a bad chain; its slots are skipped and the next chain works")
    func badAddresses() throws {
        let ring = try HostilePackedRing(size: 8)
        let overflow = UInt64.max - 10
        ring.write(id: 5, [(ring.buffer(64), 64, next), (overflow, 100, 0)])
        ring.expectBadChain(ring.pop(), id: 5, slots: 2, .memory(.overflow(address: overflow, length: 100)))
        ring.expectGivenBack(id: 5, slots: 2)
        let past = ring.guest.end - 10
        ring.write(id: 6, [(past, 64, 0)])
        ring.expectBadChain(ring.pop(), id: 6, slots: 1, .memory(.outOfRange(address: past, length: 64)))
        ring.expectGivenBack(id: 6, slots: 1)
        ring.write(id: 7, [(ring.buffer(64), 64, 0)])
        guard case let .success(chain?) = ring.pop() else { Issue.record("the good chain was not popped"); return }
        #expect(chain.head == ChainHead(id: 7) && chain.readableLength == 64)
    }

    @Test("Bad indirect tables: empty, ragged or too long, with NEXT, in a chain, nested, outside memory, not negotiated")
    func badIndirectTables() throws {
        let ring = try HostilePackedRing(size: 16)
        let table = ring.guest.allocate(64, alignment: 16)
        let data = ring.buffer(64)
        ring.driver.writePackedDescriptor(0, address: data, length: 64, id: 0, flags: 0, table: table)
        for length in [0, 8, 17, 16 * 32769] as [UInt32] {
            ring.write(id: 1, [(table.rawValue, length, indirect)])
            ring.expectBadChain(ring.pop(), id: 1, slots: 1, .invalidIndirectLength(length))
            ring.expectGivenBack(id: 1, slots: 1)
        }
        ring.write(id: 2, [(table.rawValue, 16, indirect | next), (data, 64, 0)])
        ring.expectBadChain(ring.pop(), id: 2, slots: 2, .indirectWithNext)
        ring.expectGivenBack(id: 2, slots: 2)
        ring.write(id: 3, [(data, 64, next), (table.rawValue, 16, indirect)])
        ring.expectBadChain(ring.pop(), id: 3, slots: 2, .indirectWithNext)
        ring.expectGivenBack(id: 3, slots: 2)
        let nested = ring.guest.allocate(32, alignment: 16)
        ring.driver.writePackedDescriptor(0, address: data, length: 64, id: 0, flags: 0, table: nested)
        ring.driver.writePackedDescriptor(1, address: table.rawValue, length: 16, id: 0, flags: indirect, table: nested)
        ring.write(id: 4, [(nested.rawValue, 32, indirect)])
        ring.expectBadChain(ring.pop(), id: 4, slots: 1, .nestedIndirect)
        ring.expectGivenBack(id: 4, slots: 1)
        let outside = ring.guest.end + 4096
        ring.write(id: 5, [(outside, 16, indirect)])
        ring.expectBadChain(ring.pop(), id: 5, slots: 1, .memory(.outOfRange(address: outside, length: 16)))
        ring.expectGivenBack(id: 5, slots: 1)

        let plain = try HostilePackedRing(size: 8, indirect: false)
        plain.write(id: 1, [(table.rawValue, 16, indirect)])
        plain.expectBadChain(plain.pop(), id: 1, slots: 1, .indirectNotNegotiated)
    }

    @Test("Readable after writable, and a chain past the length cap, are bad chains")
    func badShapes() throws {
        let ring = try HostilePackedRing(size: 8, maximumChainLength: 1000)
        let data = ring.buffer(1024)
        ring.write(id: 1, [(data, 64, write | next), (data, 64, 0)])
        ring.expectBadChain(ring.pop(), id: 1, slots: 2, .readableAfterWritable)
        ring.expectGivenBack(id: 1, slots: 2)
        ring.write(id: 2, [(data, 600, next), (data, 600, 0)])
        ring.expectBadChain(ring.pop(), id: 2, slots: 2, .totalLengthExceeded(limit: 1000))
    }

    @Test("A base past the ring is refused; DPDK's 16-bit base means the used position is the available one")
    func bases() throws {
        let guest = try SimulatedGuestMemory(regionSize: 1 << 20)
        let driver = SimulatedQueue(guest: guest, size: 8, eventIndex: false, layout: .packed)
        for base: UInt32 in [8, 0x8000_0009, 0x7fff] {
            #expect(throws: QueueSetupError.invalidBase(base)) {
                _ = try PackedQueue(memory: guest.memory, size: 8, rings: driver.rings, features: RingFeatures(), base: base)
            }
        }
        let dpdk = try PackedQueue(memory: guest.memory, size: 8, rings: driver.rings, features: RingFeatures(), base: 0x8003)
        #expect(dpdk.base == 0x8003_8003)
        let qemu = try PackedQueue(memory: guest.memory, size: 8, rings: driver.rings, features: RingFeatures(), base: 0x0002_8005)
        #expect(qemu.base == 0x0002_8005)
    }

    @Test("Chains put back with undoPop are popped again, across the ring's end")
    func undoAcrossTheEnd() throws {
        let ring = try HostilePackedRing(size: 4)
        let data = ring.buffer(64)
        // Move both positions to slot 3 of the first lap.
        for id in 0..<3 as Range<UInt16> {
            ring.write(id: id, [(data, 64, 0)])
            guard case let .success(chain?) = ring.pop() else { Issue.record("not popped"); return }
            ring.device.addUsed(head: chain.head, length: 0)
        }
        ring.device.publishUsed()
        _ = ring.driver.takeUsed()
        ring.write(id: 7, [(data, 64, next), (data, 64, 0)])  // slots 3 and 0: straddles the end
        ring.write(id: 8, [(data, 64, 0)])
        let before = ring.device.base
        for _ in 0..<2 { _ = ring.pop() }
        ring.device.undoPop(2)
        #expect(ring.device.base == before)
        guard case let .success(again?) = ring.pop() else { Issue.record("not popped again"); return }
        #expect(again.head == ChainHead(id: 7, slots: 2))
    }

    // MARK: Event suppression

    @Test("Interrupts follow the driver's area: disabled, enabled, and with event idx at the descriptor it names")
    func interrupts() throws {
        let ring = try HostilePackedRing(size: 8, eventIndex: true)
        let data = ring.buffer(64)
        func complete(_ count: Int) -> Bool {
            for _ in 0..<count {
                ring.write(id: 1, [(data, 64, 0)])
                guard case let .success(chain?) = ring.pop() else { return false }
                ring.device.addUsed(head: chain.head, length: 0)
            }
            ring.device.publishUsed()
            _ = ring.driver.takeUsed()
            return ring.device.needsInterrupt()
        }
        ring.driver.setNoInterrupt(true)
        #expect(!complete(1))
        ring.driver.setNoInterrupt(false)
        #expect(complete(1))
        // "Interrupt me after the 5th used slot from now" (slot 6 of the ring, this lap).
        ring.driver.setUsedEvent(ring.driver.lastSeenUsed &+ 4)
        #expect(!complete(4))
        #expect(complete(1))
        #expect(!complete(1), "passed: no more interrupts until the driver asks again")
        // Across the end of the ring: from slot 6, the event names slot 1 of the next lap.
        ring.driver.setNoInterrupt(true)
        #expect(!complete(6))
        #expect(ring.driver.nextUsedPosition == 6)
        ring.driver.setUsedEvent(ring.driver.lastSeenUsed &+ 3)
        #expect(!complete(3))
        #expect(complete(2))
    }

    @Test("Kicks follow the device's area: off while the device works, on (or at the next descriptor with event idx) when it sleeps",
          arguments: [false, true])
    func kicks(eventIndex: Bool) throws {
        let ring = try HostilePackedRing(size: 8, eventIndex: eventIndex)
        let data = ring.buffer(64)
        ring.device.disableNotifications()
        var old = ring.driver.availableIndex
        ring.write(id: 1, [(data, 64, 0)])
        #expect(!ring.driver.needsKick(since: old))
        _ = ring.pop()
        #expect(try ring.device.enableNotifications() == false)
        old = ring.driver.availableIndex
        ring.write(id: 2, [(data, 64, 0)])
        #expect(ring.driver.needsKick(since: old))
        #expect(try ring.device.enableNotifications() == true, "a chain arrived: process it rather than sleep")
    }

    @Test("One pass over a ring of bad chains handles at most its budget, then returns")
    func onePassIsBounded() throws {
        let ring = try HostilePackedRing(size: 1024)
        let data = ring.buffer(64)
        for id in 0..<1000 as Range<UInt16> { ring.write(id: id, [(data, 64, 0)]) }  // readable: no room to receive
        let counters = QueueCounters()
        let receive = ReceiveQueue(
            index: 0, backendQueue: 0, ring: ring.device, call: nil, counters: counters,
            features: [.version1, .mergeableRxBuffers, .ringPacked], mtu: 1500, filter: FilterCell(mac: guestMAC), logger: quietLogger)
        #expect(receive.process(backend: try LoopbackBackend(), budget: 256) == .budgetExhausted)
        #expect(receive.ring.base == 256 | 0x8000 | (256 | 0x8000) << 16)
        #expect(counters.dropped(.badChain) == 256)
    }
}
