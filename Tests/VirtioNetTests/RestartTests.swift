import GuestMemory
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
    @Test("A receive queue stopped with a bad chain between cached ones resumes without using any chain twice or losing one",
          .disabled("finding: ReceiveQueue.returnCachedChains undoes cacheCount pops, which is wrong when a bad chain was popped after a cached one"))
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
}
