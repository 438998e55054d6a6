import GuestMemory
import Testing
import VirtioNet
import VirtioNetTestSupport
import Virtqueue

@Suite("Notification suppression: NO_INTERRUPT, used_event and avail_event")
struct NotificationTests {
    @Test func noInterruptFlagSuppressesInterrupts() throws {
        let (device, driver, backend) = try makeLoopbackDevice(without: [.eventIndex])
        driver.receiveQueues[0].setNoInterrupt(true)
        driver.postReceiveBuffers(count: 40)
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 60))
        #expect(driver.receive(count: 1).count == 1)
        #expect(device.queuePairCounters[0].receive.interrupts.current == 0)
        driver.receiveQueues[0].setNoInterrupt(false)
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 60))
        #expect(driver.receive(count: 1).count == 1)
        #expect(device.queuePairCounters[0].receive.interrupts.current == 1)
    }

    @Test func usedEventDefersTheInterrupt() throws {
        let (device, driver, backend) = try makeLoopbackDevice()
        #expect(driver.features.contains(.eventIndex))
        let call = try #require(driver.calls[0])
        driver.receiveQueues[0].setUsedEvent(4)  // "interrupt me once used.idx passes 4"
        driver.postReceiveBuffers(count: 60)
        for number in 1...6 {
            backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 60))
            #expect(driver.receive(count: 1).count == 1)
            let signalled = (try call.drain()) != nil
            // used.idx goes 0->1 ... ; only the step from 4 to 5 crosses used_event.
            #expect(signalled == (number == 5), "frame \(number)")
        }
        #expect(device.queuePairCounters[0].receive.interrupts.current == 1)
    }

    @Test func deviceAsksForKicksThroughAvailEvent() throws {
        let guest = try SimulatedGuestMemory(regionSize: 1 << 16)
        let driver = SimulatedQueue(guest: guest, size: 8, eventIndex: true)
        var ring = try SplitQueue(memory: guest.memory, size: 8, rings: driver.rings, features: RingFeatures(eventIndex: true))
        var iovecs = IOVecArray(capacity: 8)
        let data = guest.allocate(64)
        driver.add([(data, 64, false)])
        driver.add([(data, 64, false)])
        _ = try ring.popChain(into: &iovecs)
        _ = try ring.popChain(into: &iovecs)
        #expect(try ring.enableNotifications() == false)
        // avail_event now says "kick me when you publish index 2".
        let old = driver.availableIndex
        driver.add([(data, 64, false)])
        #expect(driver.needsKick(since: old))
        // Without event idx, the NO_NOTIFY flag does the same job.
        let plain = SimulatedQueue(guest: guest, size: 8, eventIndex: false)
        let plainRing = try SplitQueue(memory: guest.memory, size: 8, rings: plain.rings, features: RingFeatures())
        plainRing.disableNotifications()
        #expect(!plain.needsKick(since: plain.availableIndex))
        #expect(try plainRing.enableNotifications() == false)
        #expect(plain.needsKick(since: plain.availableIndex))
    }

    @Test func needsEventMatchesTheSpec() {
        #expect(SplitQueue.needsEvent(eventIndex: 4, new: 5, old: 4))
        #expect(!SplitQueue.needsEvent(eventIndex: 4, new: 4, old: 3))
        #expect(SplitQueue.needsEvent(eventIndex: 0xffff, new: 1, old: 0xfffe), "wraps around")
        #expect(!SplitQueue.needsEvent(eventIndex: 10, new: 5, old: 1))
    }

    @Test("Queue state survives a reset and the queue resumes where it stopped")
    func resumeFromSavedState() throws {
        let (device, driver, backend) = try makeLoopbackDevice(without: [.mergeableRxBuffers])
        driver.postReceiveBuffers(count: 3, size: 65565)
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 60))
        #expect(driver.receive(count: 1).count == 1)
        #expect(driver.transmit(ethernetFrame(length: 60)))  // comes back through the loopback
        #expect(driver.receive(count: 1).count == 1)
        let states = device.reset()
        // RX: three posted, two used; the one the device had popped ahead goes back. TX: one consumed.
        #expect(states.first { $0.index == 0 }?.nextAvailableIndex == 2)
        #expect(states.first { $0.index == 1 }?.nextAvailableIndex == 1)
        _ = backend.drain(queue: 0)

        try device.acknowledge(features: driver.features)
        let queues = states.compactMap { state -> QueueConfiguration? in
            let queue: SimulatedQueue? = state.index == 0 ? driver.receiveQueues[0] : state.index == 1 ? driver.transmitQueues[0] : driver.controlQueue
            guard let queue else { return nil }
            return QueueConfiguration(index: state.index, size: queue.size, rings: queue.rings, nextAvailableIndex: state.nextAvailableIndex)
        }
        try device.activate(memory: driver.guest.memory, queues: queues, drive: .manual)
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 70))
        let received = driver.receive(count: 1)
        #expect(received.count == 1 && received.first?.frame.count == 70)
    }
}
