#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Synchronization
import Sys
import Testing
import VirtioNet
import VirtioNetTestSupport

@Suite("Stopping and resuming queues: where a queue stopped accounts for every chain")
struct RestartTests {
    /// With mergeable buffers the receive engine pops chains ahead until it holds 64 KiB; a bad
    /// chain among them is used (length 0) at once. `reset()` then gives the cached chains back by
    /// moving the available index back by their count, which lands on the bad chain instead of the
    /// first cached one: on resume the bad chain is used a second time and the first good chain never.
    @Test("A receive queue stopped with a bad chain between cached ones resumes without using any chain twice or losing one")
    func badChainBetweenCachedChains() throws {
        let (device, driver, backend) = try makeLoopbackDevice()
        #expect(driver.features.contains(.mergeableRxBuffers))
        let receive = driver.receiveQueues[0]
        let good = { receive.add([(driver.guest.allocate(2048), 2048, true)]) }
        let first = try #require(good())
        // A readable descriptor in a receive chain: the device refuses it and uses it, length 0.
        let bad = try #require(receive.add([(driver.guest.allocate(64), 64, false)]))
        let second = try #require(good())
        device.poll()  // caches `first` and `second`; no frame waits yet
        let stopped = device.reset()
        let receiveState = try #require(stopped.first { $0.index == 0 })

        // Resume the same rings where the device said they stopped, and send two frames.
        try device.acknowledge(features: driver.features)
        var queues: [QueueConfiguration] = []
        for (index, queue) in [(0, receive), (1, driver.transmitQueues[0])] {
            let state = stopped.first { $0.index == index }
            queues.append(QueueConfiguration(index: index, size: queue.size, rings: queue.rings,
                                             nextAvailableIndex: state?.nextAvailableIndex ?? 0, kick: try EventFD(), call: try EventFD()))
        }
        try device.activate(memory: driver.guest.memory, queues: queues, drive: .manual)
        for seed in 0..<2 { #expect(backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 100, seed: UInt8(seed)))) }
        device.poll()

        let used = receive.takeUsed().map(\.head)
        #expect(used.sorted() == [first, bad, second].sorted(),
                "stopped at \(receiveState.nextAvailableIndex); used heads \(used) for chains \(first) (good), \(bad) (bad), \(second) (good)")
        device.reset()
    }

    /// reset() takes the queues and clears DEVICE_NEEDS_RESET under the state lock, then stops the
    /// workers. A worker still in its pass can find a broken ring in between and set it again, so a
    /// reset device (the next vhost-user frontend's) starts out needing a reset.
    @Test("A ring broken while reset() waits for the workers does not leave the reset device needing a reset")
    func ringBrokenDuringReset() throws {
        let backend = try BlockingReceiveBackend()
        let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC, mtu: 1500, queuePairs: 1), backend: backend)
        let driver = try SimulatedNetDriver(device: device, threaded: true)
        #expect(backend.loopback.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 100)))
        driver.postReceiveBuffers(count: 1)
        #expect(waitFor { backend.isInside }, "the worker is inside receive")

        let resetter = try WorkerThread(name: "resetter") { _ = device.reset() }
        #expect(waitFor { !device.isActive }, "reset() took the queues and now waits for the worker")
        // The guest moves avail.idx past the ring size: the worker's next look at the ring fails.
        let receive = driver.receiveQueues[0]
        receive.setAvailableIndex(receive.availableIndex &+ 300)
        backend.release()
        resetter.join()
        #expect(!device.isActive)
        #expect(!device.needsReset, "reset() returned a device that needs a reset")
    }
}

/// Polls `condition` every millisecond for up to 10 s.
private func waitFor(_ condition: () -> Bool) -> Bool {
    for _ in 0..<10_000 {
        if condition() { return true }
        _ = poll(nil, 0, 1)
    }
    return condition()
}

/// A loopback backend whose first receive waits until the test releases it.
private final class BlockingReceiveBackend: PacketBackend {
    let loopback: LoopbackBackend
    private let state = Mutex<(inside: Bool, released: Bool)>((false, false))

    init() throws { loopback = try LoopbackBackend() }

    var isInside: Bool { state.withLock { $0.inside } }
    func release() { state.withLock { $0.released = true } }

    var queuePairs: Int { loopback.queuePairs }
    var receiveOffloads: OffloadSet { loopback.receiveOffloads }
    var transmitOffloads: OffloadSet { loopback.transmitOffloads }
    func setReceiveOffloads(_ offloads: OffloadSet) throws(BackendError) { try loopback.setReceiveOffloads(offloads) }
    func setActiveQueuePairs(_ count: Int) throws(BackendError) { try loopback.setActiveQueuePairs(count) }
    func descriptor(queue: Int) -> Int32 { loopback.descriptor(queue: queue) }
    func transmit(queue: Int, frame: UnsafeBufferPointer<iovec>) -> TransmitOutcome { loopback.transmit(queue: queue, frame: frame) }

    func receive(queue: Int, into buffers: UnsafeBufferPointer<iovec>) -> ReceiveOutcome {
        let first = state.withLock { state -> Bool in
            defer { state.inside = true }
            return !state.inside
        }
        if first { _ = waitFor { state.withLock { $0.released } } }
        return loopback.receive(queue: queue, into: buffers)
    }
}
