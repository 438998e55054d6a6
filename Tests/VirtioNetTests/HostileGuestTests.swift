import GuestMemory
import Testing
import VirtioNet
import VirtioNetTestSupport
import Virtqueue

/// A device-side split queue over a driver-side ring, for writing malicious chains by hand.
private final class HostileRing {
    let guest: SimulatedGuestMemory
    let driver: SimulatedQueue
    var device: SplitQueue
    var iovecs = IOVecArray(capacity: 64)

    init(size: Int = 16, indirect: Bool = true, maximumChainLength: UInt32 = SplitQueue.defaultMaximumChainLength) throws {
        guest = try SimulatedGuestMemory(regionSize: 1 << 20)
        driver = SimulatedQueue(guest: guest, size: size, eventIndex: false)
        guest.sealRingArea()
        device = try SplitQueue(memory: guest.memory, size: size, rings: driver.rings,
                                features: RingFeatures(indirectDescriptors: indirect), maximumChainLength: maximumChainLength)
    }

    /// A buffer of `length` bytes in guest memory.
    func buffer(_ length: Int) -> UInt64 { guest.allocate(length).rawValue }

    func pop() -> Result<DescriptorChain?, VirtqueueError> {
        iovecs.removeAll()
        do throws(VirtqueueError) { return .success(try device.popChain(into: &iovecs)) } catch { return .failure(error) }
    }

    func expectBadChain(_ result: Result<DescriptorChain?, VirtqueueError>, head: ChainHead, _ fault: ChainFault,
                        sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(result == .failure(.badChain(head: head, fault)), sourceLocation: sourceLocation)
    }
}

@Suite("Hostile guests: every malformed ring is an error for that chain or a broken queue, never a crash")
struct HostileGuestTests {
    @Test func descriptorLoopEnds() throws {
        let ring = try HostileRing()
        let data = ring.buffer(64)
        ring.driver.writeDescriptor(0, address: data, length: 64, flags: SimulatedQueue.flagNext, next: 1)
        ring.driver.writeDescriptor(1, address: data, length: 64, flags: SimulatedQueue.flagNext, next: 0)
        ring.driver.makeAvailable(head: 0)
        ring.expectBadChain(ring.pop(), head: 0, .tooManyDescriptors)
        #expect(ring.iovecs.count == 0, "nothing of a refused chain is handed out")
    }

    @Test func nextIndexBeyondQueueSize() throws {
        let ring = try HostileRing(size: 16)
        ring.driver.writeDescriptor(3, address: ring.buffer(64), length: 64, flags: SimulatedQueue.flagNext, next: 16)
        ring.driver.makeAvailable(head: 3)
        ring.expectBadChain(ring.pop(), head: 3, .nextOutOfRange(16))
    }

    @Test func addressPlusLengthOverflows() throws {
        let ring = try HostileRing()
        let address = UInt64.max - 10
        ring.driver.writeDescriptor(0, address: address, length: 100, flags: 0, next: 0)
        ring.driver.makeAvailable(head: 0)
        ring.expectBadChain(ring.pop(), head: 0, .memory(.overflow(address: address, length: 100)))
    }

    @Test func bufferEndsPastItsRegion() throws {
        let ring = try HostileRing()
        let address = ring.guest.end - 10
        ring.driver.writeDescriptor(0, address: address, length: 100, flags: SimulatedQueue.flagWrite, next: 0)
        ring.driver.makeAvailable(head: 0)
        ring.expectBadChain(ring.pop(), head: 0, .memory(.outOfRange(address: address, length: 100)))
        ring.driver.writeDescriptor(1, address: 0x10, length: 16, flags: 0, next: 0)  // below every region
        ring.driver.makeAvailable(head: 1)
        ring.expectBadChain(ring.pop(), head: 1, .memory(.outOfRange(address: 0x10, length: 16)))
    }

    @Test func indirectTableInsideIndirectTable() throws {
        let ring = try HostileRing()
        let inner = ring.guest.allocate(32)
        let outer = ring.guest.allocate(32)
        ring.driver.writeDescriptor(0, address: ring.buffer(64), length: 64, flags: 0, next: 0, table: inner)
        ring.driver.writeDescriptor(0, address: inner.rawValue, length: 16, flags: SimulatedQueue.flagIndirect, next: 0, table: outer)
        ring.driver.writeDescriptor(0, address: outer.rawValue, length: 16, flags: SimulatedQueue.flagIndirect, next: 0)
        ring.driver.makeAvailable(head: 0)
        ring.expectBadChain(ring.pop(), head: 0, .nestedIndirect)
    }

    @Test(arguments: [0, 8, 17, 24, 16 * 32769] as [UInt32])
    func indirectTableOfInvalidLength(length: UInt32) throws {
        let ring = try HostileRing()
        ring.driver.writeDescriptor(0, address: ring.buffer(64), length: length, flags: SimulatedQueue.flagIndirect, next: 0)
        ring.driver.makeAvailable(head: 0)
        ring.expectBadChain(ring.pop(), head: 0, .invalidIndirectLength(length))
    }

    @Test func indirectTogetherWithNext() throws {
        let ring = try HostileRing()
        let table = ring.guest.allocate(16)
        ring.driver.writeDescriptor(0, address: ring.buffer(64), length: 64, flags: 0, next: 0, table: table)
        ring.driver.writeDescriptor(0, address: table.rawValue, length: 16, flags: SimulatedQueue.flagIndirect | SimulatedQueue.flagNext, next: 1)
        ring.driver.makeAvailable(head: 0)
        ring.expectBadChain(ring.pop(), head: 0, .indirectWithNext)
    }

    @Test func indirectWithoutTheFeature() throws {
        let ring = try HostileRing(indirect: false)
        let table = ring.guest.allocate(16)
        ring.driver.writeDescriptor(0, address: ring.buffer(64), length: 64, flags: 0, next: 0, table: table)
        ring.driver.writeDescriptor(0, address: table.rawValue, length: 16, flags: SimulatedQueue.flagIndirect, next: 0)
        ring.driver.makeAvailable(head: 0)
        ring.expectBadChain(ring.pop(), head: 0, .indirectNotNegotiated)
    }

    @Test func indirectTableOutsideMemory() throws {
        let ring = try HostileRing()
        ring.driver.writeDescriptor(0, address: ring.guest.end - 8, length: 32, flags: SimulatedQueue.flagIndirect, next: 0)
        ring.driver.makeAvailable(head: 0)
        ring.expectBadChain(ring.pop(), head: 0, .memory(.outOfRange(address: ring.guest.end - 8, length: 32)))
    }

    @Test func loopInsideAnIndirectTable() throws {
        let ring = try HostileRing()
        let table = ring.guest.allocate(32)
        let data = ring.buffer(64)
        ring.driver.writeDescriptor(0, address: data, length: 8, flags: SimulatedQueue.flagNext, next: 1, table: table)
        ring.driver.writeDescriptor(1, address: data, length: 8, flags: SimulatedQueue.flagNext, next: 0, table: table)
        ring.driver.writeDescriptor(0, address: table.rawValue, length: 32, flags: SimulatedQueue.flagIndirect, next: 0)
        ring.driver.makeAvailable(head: 0)
        ring.expectBadChain(ring.pop(), head: 0, .tooManyDescriptors)
    }

    @Test func readableAfterWritable() throws {
        let ring = try HostileRing()
        ring.driver.writeDescriptor(0, address: ring.buffer(64), length: 64, flags: SimulatedQueue.flagWrite | SimulatedQueue.flagNext, next: 1)
        ring.driver.writeDescriptor(1, address: ring.buffer(64), length: 64, flags: 0, next: 0)
        ring.driver.makeAvailable(head: 0)
        ring.expectBadChain(ring.pop(), head: 0, .readableAfterWritable)
    }

    @Test func chainLongerThanTheCap() throws {
        let ring = try HostileRing(maximumChainLength: 4096)
        ring.driver.writeDescriptor(0, address: ring.buffer(4000), length: 4000, flags: SimulatedQueue.flagNext, next: 1)
        ring.driver.writeDescriptor(1, address: ring.buffer(4000), length: 4000, flags: 0, next: 0)
        ring.driver.makeAvailable(head: 0)
        ring.expectBadChain(ring.pop(), head: 0, .totalLengthExceeded(limit: 4096))
    }

    @Test func availableIndexJumpsPastTheQueueSize() throws {
        let ring = try HostileRing(size: 16)
        ring.driver.setAvailableIndex(17)
        #expect(ring.pop() == .failure(.broken(.availableIndexJump(from: 0, to: 17))))
        // Exactly the queue size is legal (a full ring).
        ring.driver.setAvailableIndex(16)
        #expect((try? ring.device.availableCount()) == 16)
    }

    @Test func headBeyondTheTable() throws {
        let ring = try HostileRing(size: 16)
        ring.driver.makeAvailable(head: 40)
        #expect(ring.pop() == .failure(.broken(.headOutOfRange(40))))
        #expect(ring.device.nextAvailableIndex == 0, "a broken queue consumes nothing")
    }

    @Test func aGoodChainAfterBadOnesStillWorks() throws {
        let ring = try HostileRing()
        ring.driver.writeDescriptor(0, address: UInt64.max, length: 2, flags: 0, next: 0)
        ring.driver.makeAvailable(head: 0)
        let data = ring.buffer(100)
        ring.driver.writeDescriptor(1, address: data, length: 30, flags: SimulatedQueue.flagNext, next: 2)
        ring.driver.writeDescriptor(2, address: data + 30, length: 70, flags: SimulatedQueue.flagWrite, next: 0)
        ring.driver.makeAvailable(head: 1)
        #expect(throws: Never.self) { () -> Void in
            if case .success = ring.pop() { Issue.record("the bad chain was accepted") }
        }
        let good = ring.pop()
        guard case .success(let chain?) = good else {
            Issue.record("good chain refused: \(good)")
            return
        }
        #expect(chain.head == 1 && chain.readableLength == 30 && chain.writableLength == 70)
        #expect(chain.readable.count == 1 && chain.writable.count == 1)
    }

    // MARK: The same faults through the device

    @Test("A transmit chain with a writable descriptor is returned unused and counted")
    func transmitChainWithWritableDescriptor() throws {
        let (device, driver, backend) = try makeLoopbackDevice()
        let queue = driver.transmitQueues[0]
        let frame = driver.guest.allocate(100)
        driver.guest.write(VirtioNetHeader().bytes + ethernetFrame(length: 60), at: frame)
        queue.add([(frame, 72, false), (driver.guest.allocate(16), 16, true)])
        driver.drive(device)
        let used = queue.takeUsed()
        #expect(used.count == 1 && used.first?.length == 0)
        #expect(device.queuePairCounters[0].transmit.dropped(.badChain) == 1)
        #expect(backend.pendingFrames(queue: 0) == 0, "nothing reached the backend")
        #expect(!device.needsReset)
        // The queue goes on working.
        driver.postReceiveBuffers(count: 40)
        #expect(driver.transmit(ethernetFrame(length: 60)))
        #expect(driver.receive(count: 1).count == 1)
    }

    @Test("Bad transmit headers are dropped and counted, and the ring goes on")
    func badTransmitHeaders() throws {
        let (device, driver, backend) = try makeLoopbackDevice(without: [.hostTSO6, .hostUFO, .hostUSO])
        let bad: [VirtioNetHeader] = [
            VirtioNetHeader(flags: .needsCsum, csumStart: 1000, csumOffset: 6),       // beyond the frame
            VirtioNetHeader(flags: .needsCsum, gsoType: .tcpv6, gsoSize: 1400, csumStart: 54, csumOffset: 16),  // not negotiated
            VirtioNetHeader(gsoType: .tcpv4, gsoSize: 0),                            // gso_size 0
            VirtioNetHeader(flags: VirtioNetHeader.Flags(rawValue: 0x40)),           // unknown flag
        ]
        for header in bad { #expect(driver.transmit(ethernetFrame(length: 200), header: header)) }
        #expect(device.queuePairCounters[0].transmit.dropped(.badHeader) == UInt64(bad.count))
        #expect(driver.completedTransmits().count == bad.count)
        #expect(backend.pendingFrames(queue: 0) == 0)
        var unknownType = VirtioNetHeader()
        unknownType.gsoTypeRaw = 2
        #expect(driver.transmit(ethernetFrame(length: 200), header: unknownType))
        #expect(device.queuePairCounters[0].transmit.dropped(.badHeader) == UInt64(bad.count + 1))
    }

    @Test("An oversize frame without GSO is dropped and counted; at the MTU it passes")
    func oversizeFrames() throws {
        let (device, driver, backend) = try makeLoopbackDevice(mtu: 1500)
        #expect(driver.transmit(ethernetFrame(length: 1500 + 14 + 4 + 1)))
        #expect(device.queuePairCounters[0].transmit.dropped(.oversize) == 1)
        #expect(driver.transmit(ethernetFrame(length: 1500 + 14)))
        #expect(backend.pendingFrames(queue: 0) == 1)
    }

    @Test("A guest that moves avail.idx too far marks the device as needing a reset")
    func brokenRingNeedsReset() throws {
        let (device, driver, _) = try makeLoopbackDevice()
        driver.transmitQueues[0].setAvailableIndex(1000)
        #expect(device.poll() == false)
        #expect(device.needsReset)
        let states = device.reset()
        #expect(!device.needsReset)
        #expect(states.contains(QueueState(index: 1, nextAvailableIndex: 0)))
    }

    @Test("Receive chains with readable descriptors are refused; good ones still receive")
    func receiveChainWithReadableDescriptor() throws {
        let (device, driver, backend) = try makeLoopbackDevice(without: [.mergeableRxBuffers, .guestTSO4, .guestTSO6, .guestUFO, .guestUSO4, .guestUSO6, .guestECN])
        let queue = driver.receiveQueues[0]
        queue.add([(driver.guest.allocate(64), 64, false), (driver.guest.allocate(2048), 2048, true)])
        queue.add([(driver.guest.allocate(4), 4, true)])  // shorter than the header
        driver.postReceiveBuffers(count: 1, size: 2048)
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 100))
        let frames = driver.receive(count: 1)
        #expect(frames.count == 1)
        #expect(device.queuePairCounters[0].receive.dropped(.badChain) == 2)
    }
}
