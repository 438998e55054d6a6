import Sys
import Testing
import VirtioNet
import VirtioNetTestSupport

@Suite("Worker threads drive the queues from kicks and backend readiness")
struct WorkerTests {
    @Test(arguments: [1, 3])
    func framesRoundTripOnEveryQueuePair(pairs: Int) throws {
        let (device, driver, _) = try makeLoopbackDevice(queuePairs: pairs, threaded: true)
        defer { device.reset() }
        for pair in 0..<pairs { driver.postReceiveBuffers(pair: pair, count: 100) }
        for pair in 0..<pairs {
            let frames = (0..<50).map { ethernetFrame(length: 60 + $0 * 20, seed: UInt8(pair * 50 + $0)) }
            for frame in frames { #expect(driver.transmit(frame, pair: pair)) }
            let received = driver.receive(count: frames.count, pair: pair)
            #expect(received.map(\.frame) == frames, "pair \(pair)")
        }
        // A worker adds up a pass's frames after it published them: the last count may trail a little.
        for pair in 0..<pairs {
            #expect(device.queuePairCounters[pair].transmit.frames.current == 50)
            #expect(driver.waitUntil { device.queuePairCounters[pair].receive.frames.current == 50 },
                    "pair \(pair) received \(device.queuePairCounters[pair].receive.frames.current)")
        }
    }

    @Test("Receive waits for buffers without spinning, then resumes when the guest posts some")
    func receiveResumesWhenBuffersArrive() throws {
        let (device, driver, backend) = try makeLoopbackDevice(threaded: true)
        defer { device.reset() }
        for number in 0..<5 { backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 100, seed: UInt8(number))) }
        // No buffers yet: nothing can arrive, and the frames wait in the backend.
        #expect(driver.receive(count: 1, timeout: 0.2).isEmpty)
        #expect(backend.pendingFrames(queue: 0) == 5)
        driver.postReceiveBuffers(count: 100)
        #expect(driver.receive(count: 5).count == 5)
        #expect(device.queuePairCounters[0].receive.kicks.current >= 1)
    }

    @Test("Control commands are answered by the worker")
    func controlThroughTheWorker() throws {
        let (device, driver, _) = try makeLoopbackDevice(queuePairs: 2, threaded: true)
        defer { device.reset() }
        #expect(driver.control(class: 4, command: 0, data: [2, 0]) == 0)
        #expect(device.activeQueuePairs == 2)
    }

    @Test("With event idx, every control command is answered, not only the first (the worker asks for the next kick)")
    func controlCommandsInARowWithEventIndex() throws {
        let (device, driver, _) = try makeLoopbackDevice(queuePairs: 2, threaded: true)
        defer { device.reset() }
        #expect(driver.features.contains(.eventIndex))
        for pairs in [2, 1, 2, 1] {
            #expect(driver.control(class: 4, command: 0, data: [UInt8(pairs), 0]) == 0)
            #expect(device.activeQueuePairs == pairs)
        }
    }

    @Test("Reset stops the workers and reports queue positions; the device can be activated again")
    func resetStopsWorkers() throws {
        let (device, driver, _) = try makeLoopbackDevice(threaded: true)
        driver.postReceiveBuffers(count: 100)
        #expect(driver.transmit(ethernetFrame(length: 60)))
        #expect(driver.receive(count: 1).count == 1)
        let states = device.reset()
        #expect(!device.isActive)
        #expect(states.first { $0.index == 1 }?.nextAvailableIndex == 1)
        #expect(states.first { $0.index == 0 }?.nextAvailableIndex == 1)
    }

    @Test("A broken ring marks the device as needing a reset; the other queues keep working")
    func brokenRingInWorkerMode() throws {
        let (device, driver, _) = try makeLoopbackDevice(queuePairs: 2, threaded: true)
        defer { device.reset() }
        driver.transmitQueues[1].setAvailableIndex(999)
        try driver.kicks[3]?.signal()
        #expect(driver.waitUntil { device.needsReset })
        driver.postReceiveBuffers(count: 50)
        #expect(driver.transmit(ethernetFrame(length: 80)))
        #expect(driver.receive(count: 1).count == 1)
    }

    @Test("A broken ring signals its error eventfd (vhost-user SET_VRING_ERR)")
    func brokenRingSignalsErrorEventFD() throws {
        let backend = try LoopbackBackend()
        let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC), backend: backend)
        defer { device.reset() }
        let guest = try SimulatedGuestMemory(regionSize: 1 << 20)
        let queue = SimulatedQueue(guest: guest, size: 16, eventIndex: false)
        try device.acknowledge(features: [.version1])
        let kick = try EventFD()
        let error = try EventFD()
        try device.activate(memory: guest.memory, queues: [
            QueueConfiguration(index: 1, size: 16, rings: queue.rings, kick: kick, error: error),
        ])
        #expect(try error.drain() == nil)
        queue.setAvailableIndex(100)
        try kick.signal()
        let deadline = SimulatedNetDriver.now() + 10
        var signalled = false
        while !signalled && SimulatedNetDriver.now() < deadline {
            _ = try waitReadable([error.rawValue], timeoutMilliseconds: 100)
            signalled = try error.drain() != nil
        }
        #expect(signalled)
        #expect(device.needsReset)
    }
}

@Suite("Announcements go out from the thread that owns queue pair 0")
struct AnnouncementTests {
    @Test("announce(mac:) from another thread: the RARP frame is sent by the pair-0 worker, in front of the guest's frames")
    func announcementIsSentByTheWorker() throws {
        let backend = try SenderRecordingBackend()
        let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC), backend: backend)
        let driver = try SimulatedNetDriver(device: device, threaded: true)
        defer { device.reset() }
        driver.postReceiveBuffers(count: 8)
        let mac = MACAddress(0x52, 0x54, 0x00, 0xab, 0xcd, 0xef)
        device.announce(mac: mac)
        let frames = driver.receive(count: 1)
        #expect(frames.count == 1)
        #expect(frames.first.map { Array($0.frame[6..<14]) } == mac.array + [0x80, 0x35], "a RARP from the announced MAC")
        #expect(backend.senders == ["vnet-qp0"])
    }

    @Test("Without running queues the announcement goes out at once; in manual mode with the next poll()")
    func announcementWithoutWorkers() throws {
        let backend = try SenderRecordingBackend()
        let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC), backend: backend)
        device.announce(mac: guestMAC)
        #expect(backend.inner.pendingFrames(queue: 0) == 1)
        _ = backend.inner.drain(queue: 0)
        let driver = try SimulatedNetDriver(device: device)
        driver.drive = { _ in }
        device.announce(mac: guestMAC)
        #expect(backend.inner.pendingFrames(queue: 0) == 0)
        device.poll()
        #expect(backend.inner.pendingFrames(queue: 0) == 1)
    }
}
