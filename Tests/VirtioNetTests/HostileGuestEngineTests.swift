#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Synchronization
import Sys
import Logging
import Testing
@testable import VirtioNet
import VirtioNetTestSupport
import Virtqueue

/// A device on a loopback backend whose rings may be as large as 32768, with a driver that negotiated
/// everything offered minus `without`.
private func makeDevice(queueSize: Int = 256, without: VirtioNetFeatures = [], threaded: Bool = false,
                        layout: SimulatedQueue.Layout = .split)
    throws -> (device: NetDevice, driver: SimulatedNetDriver, backend: LoopbackBackend)
{
    let backend = try LoopbackBackend()
    let device = try NetDevice(
        configuration: NetConfiguration(mac: guestMAC, mtu: 65535, maximumQueueSize: 32768), backend: backend,
        logger: quietLogger)
    let guest = try SimulatedGuestMemory(regionSize: 64 << 20)
    let driver = try SimulatedNetDriver(device: device, wanted: device.offeredFeatures.subtracting(without),
                                        queueSize: queueSize, layout: layout, guest: guest, threaded: threaded)
    return (device, driver, backend)
}

/// Posts one receive chain of `segments` writable descriptors of `segmentLength` bytes each; returns its head.
@discardableResult
private func postReceiveChain(_ driver: SimulatedNetDriver, segments: Int, segmentLength: Int, indirect: Bool) -> UInt16? {
    let queue = driver.receiveQueues[0]
    let old = queue.availableIndex
    let base = driver.guest.allocate(segments * segmentLength)
    let chain = (0..<segments).map { index in
        (address: GuestAddress(base.rawValue + UInt64(index * segmentLength)), length: UInt32(segmentLength), writable: true)
    }
    let head = queue.add(chain, indirect: indirect)
    driver.kick(queue: queue, index: 0, since: old)
    return head
}

private let gsoFeatures: VirtioNetFeatures = [.guestTSO4, .guestTSO6, .guestECN, .guestUFO, .guestUSO4, .guestUSO6]

/// The feature combinations the receive engine behaves differently in.
struct EngineOptions: CustomTestStringConvertible, Sendable {
    var mergeable: Bool
    var gso: Bool
    var indirect: Bool
    var layout: SimulatedQueue.Layout = .split
    var testDescription: String { "mrg_rxbuf=\(mergeable) gso=\(gso) indirect=\(indirect) \(layout)" }
    var without: VirtioNetFeatures {
        var without: VirtioNetFeatures = []
        if !mergeable { without.insert(.mergeableRxBuffers) }
        if !gso { without.formUnion(gsoFeatures) }
        return without
    }
    static let all: [EngineOptions] = [SimulatedQueue.Layout.split, .packed].flatMap { layout in
        [false, true].flatMap { mergeable in
            [false, true].flatMap { gso in [false, true].map { EngineOptions(mergeable: mergeable, gso: gso, indirect: $0, layout: layout) } }
        }
    }
}

@Suite("Hostile guests against the engines: limits at their edges, no overflow, no livelock, no lost buffers")
struct HostileGuestEngineTests {
    /// One read or write takes at most this many segments (UIO_MAXIOV); a chain may have no more.
    static let segmentLimit = SplitQueue.maximumSegmentsPerChain

    @Test("A receive chain of 4096 one-byte buffers in one indirect table is refused (GSO, bounce path); the next buffers get the frame",
          arguments: [SimulatedQueue.Layout.split, .packed])
    func indirectTableOfOneByteBuffers(layout: SimulatedQueue.Layout) throws {
        let (device, driver, backend) = try makeDevice(layout: layout)
        try #require(postReceiveChain(driver, segments: 4096, segmentLength: 1, indirect: true) != nil)
        driver.postReceiveBuffers(count: 40, size: 2048)
        let frame = ethernetFrame(length: 1000, seed: 3)
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + frame)
        let frames = driver.receive(count: 1)
        let intact = frames.map(\.frame) == [frame]
        #expect(intact, "the frame arrived whole in the next buffers")
        #expect(device.queuePairCounters[0].receive.snapshot.drops[.badChain] == 1)
    }

    @Test("Receive chains of exactly the segment limit carry a frame that fills every segment; one more segment is refused",
          arguments: EngineOptions.all)
    func receiveChainAtTheSegmentLimit(options: EngineOptions) throws {
        let queueSize = options.indirect ? 256 : 4096
        let (device, driver, backend) = try makeDevice(queueSize: queueSize, without: options.without, layout: options.layout)
        defer { device.reset() }
        #expect(driver.features.contains(.mergeableRxBuffers) == options.mergeable)
        // 1024 segments of 64 bytes hold 65536 bytes: a header and a 65524-byte frame fill them all.
        try #require(postReceiveChain(driver, segments: Self.segmentLimit, segmentLength: 64, indirect: options.indirect) != nil)
        let frame = ethernetFrame(length: Self.segmentLimit * 64 - VirtioNetHeader.size, seed: 1)
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + frame)
        let first = driver.receive(count: 1)
        #expect(first.map(\.frame.count) == [frame.count])
        let intact = first.first?.frame == frame
        #expect(intact, "the frame filling every segment arrived whole")
        #expect(device.queuePairCounters[0].receive.snapshot.drops.values.allSatisfy { $0 == 0 })

        // One more segment than a read can take: refused as a bad chain, the next buffer is used.
        try #require(postReceiveChain(driver, segments: Self.segmentLimit + 1, segmentLength: 64, indirect: options.indirect) != nil)
        try #require(postReceiveChain(driver, segments: 2, segmentLength: 40000, indirect: options.indirect) != nil)
        let second = ethernetFrame(length: 3000, seed: 2)
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + second)
        let secondIntact = driver.receive(count: 1).map(\.frame) == [second]
        #expect(secondIntact, "the next frame arrived whole")
        #expect(device.queuePairCounters[0].receive.snapshot.drops[.badChain] == 1)
    }

    @Test("Transmit chains of exactly the segment limit are sent; one more segment is refused and the next frame goes",
          arguments: [false, true], [SimulatedQueue.Layout.split, .packed])
    func transmitChainAtTheSegmentLimit(indirect: Bool, layout: SimulatedQueue.Layout) throws {
        let (device, driver, backend) = try makeDevice(queueSize: indirect ? 256 : 4096, layout: layout)
        driver.useIndirect = indirect
        let atLimit = ethernetFrame(length: Self.segmentLimit * 64 - VirtioNetHeader.size, seed: 4)
        let overLimit = ethernetFrame(length: Self.segmentLimit * 64 - VirtioNetHeader.size + 1, seed: 5)
        let last = ethernetFrame(length: 200, seed: 6)
        let added = [driver.transmit(atLimit, segmentSize: 64), driver.transmit(overLimit, segmentSize: 64), driver.transmit(last)]
        #expect(added == [true, true, true])
        let queue = driver.transmitQueues[0]
        #expect(driver.waitUntil { queue.usedIndex == queue.availableIndex })
        let sent = backend.drain(queue: 0).map { Array($0.dropFirst(VirtioNetHeader.size)) }
        #expect(sent.map(\.count) == [atLimit.count, last.count])
        let intact = sent == [atLimit, last]
        #expect(intact, "the frame at the limit and the one after went out whole")
        #expect(device.queuePairCounters[0].transmit.snapshot.drops[.badChain] == 1)
    }

    @Test("A frame too large for every buffer one read can reach is dropped, not waited for; receive goes on (no livelock)",
          arguments: [SimulatedQueue.Layout.split, .packed])
    func bouncedFrameThatCanNeverFit(layout: SimulatedQueue.Layout) throws {
        let (device, driver, backend) = try makeDevice(threaded: true, layout: layout)
        defer { device.reset() }
        // Four chains of 1023 one-byte buffers: one read reaches only the first.
        for _ in 0..<4 { try #require(postReceiveChain(driver, segments: 1023, segmentLength: 1, indirect: true) != nil) }
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 5000, seed: 1))
        #expect(driver.waitUntil { device.queuePairCounters[0].receive.snapshot.drops[.tooLarge] == 1 })
        // More buffers come; the next frames arrive whole.
        driver.postReceiveBuffers(count: 8, size: 2048)
        let frames = (0..<3).map { ethernetFrame(length: 100 + $0, seed: UInt8(10 + $0)) }
        for frame in frames { backend.inject(queue: 0, frame: VirtioNetHeader().bytes + frame) }
        let intact = driver.receive(count: 3).map(\.frame) == frames
        #expect(intact, "the next frames arrived whole")
    }

    @Test("One pass over a ring of bad chains handles at most its budget, then returns (receive and control)")
    func onePassIsBounded() throws {
        let guest = try SimulatedGuestMemory()
        let receiveRing = SimulatedQueue(guest: guest, size: 1024, eventIndex: false)
        let controlRing = SimulatedQueue(guest: guest, size: 1024, eventIndex: false)
        guest.sealRingArea()
        for ring in [receiveRing, controlRing] {
            // A readable-only chain: bad for receive (no room) and for control (no ack byte).
            ring.writeDescriptor(0, address: guest.allocate(64).rawValue, length: 64, flags: 0, next: 0)
            for _ in 0..<1000 { ring.makeAvailable(head: 0, publish: false) }
            ring.publishAvailable()
        }
        let logger = Logger(label: "bounded-pass", factory: { _ in SwiftLogNoOpLogHandler() })
        let receiveCounters = QueueCounters()
        let receive = ReceiveQueue(
            index: 0, backendQueue: 0,
            ring: try SplitQueue(memory: guest.memory, size: 1024, rings: receiveRing.rings, features: RingFeatures()),
            call: nil, counters: receiveCounters, features: [.version1, .mergeableRxBuffers, .guestTSO4], mtu: 1500,
            filter: FilterCell(mac: guestMAC), logger: logger)
        #expect(receive.process(backend: try LoopbackBackend(), budget: 256) == .budgetExhausted)
        #expect(receive.ring.nextAvailableIndex == 256)
        #expect(receiveCounters.dropped(.badChain) == 256)

        let controlCounters = QueueCounters()
        let control = ControlQueueEngine(
            index: 2, ring: try SplitQueue(memory: guest.memory, size: 1024, rings: controlRing.rings, features: RingFeatures()),
            call: nil, counters: controlCounters, logger: logger, execute: { _ in .ok })
        #expect(control.process(budget: 256) == .budgetExhausted)
        #expect(control.ring.nextAvailableIndex == 256)
        #expect(controlCounters.dropped(.badChain) == 256)
    }

    @Test("A guest that keeps publishing bad receive chains cannot keep the worker from stopping")
    func badReceiveChainStorm() throws {
        let (device, driver, _) = try makeDevice(threaded: true)
        try expectResetDespiteStorm(device: device, queue: driver.receiveQueues[0], kick: driver.kicks[0])
    }

    @Test("A guest that keeps publishing bad control commands cannot keep the worker from stopping")
    func badControlCommandStorm() throws {
        let (device, driver, _) = try makeDevice(threaded: true)
        let control = try #require(driver.controlQueue)
        try expectResetDespiteStorm(device: device, queue: control, kick: driver.kicks[device.controlQueueIndex(features: driver.features)])
    }

    /// Makes a readable-only chain (bad for receive and for control) available again and again from
    /// a thread of its own, while the test resets the device. The storm never waits for used.idx (the
    /// device need not publish): it watches the used ring slot the device fills for each chain, so it
    /// adds the next chain as soon as the last one was consumed and the ring never looks broken.
    private func expectResetDespiteStorm(device: NetDevice, queue: SimulatedQueue, kick: EventFD?) throws {
        let head: UInt16 = 0
        #expect(queue.claim([head]))
        queue.writeDescriptor(Int(head), address: queue.guest.allocate(64).rawValue, length: 64, flags: 0, next: 0)
        let stop = Atomic<Bool>(false)
        let made = Atomic<Int>(0)
        let sentinel = UInt32.max
        let storm = try WorkerThread(name: "bad-chain-storm") {
            let start = SimulatedNetDriver.now()
            var next = queue.availableIndex
            while !stop.load(ordering: .relaxed) && SimulatedNetDriver.now() - start < 60 {
                let slot = GuestAddress(queue.usedRing.rawValue + 4 + UInt64(8 * (Int(next) % queue.size)))
                queue.guest.store(sentinel, at: slot)
                let old = queue.availableIndex
                queue.makeAvailable(head: head)
                next &+= 1
                if queue.needsKick(since: old) { try? kick?.signal() }
                made.add(1, ordering: .relaxed)
                while !stop.load(ordering: .relaxed) && queue.guest.load(UInt32.self, at: slot) == sentinel
                    && SimulatedNetDriver.now() - start < 60 {}
            }
        }
        defer {
            stop.store(true, ordering: .relaxed)
            storm.join()
        }
        #expect(eventually { made.load(ordering: .relaxed) > 10_000 }, "the worker consumes the bad chains")
        let resetDone = Atomic<Bool>(false)
        let resetter = try WorkerThread(name: "resetter") {
            device.reset()
            resetDone.store(true, ordering: .releasing)
        }
        #expect(eventually(timeout: 15) { resetDone.load(ordering: .acquiring) }, "reset returned while the storm went on")
        stop.store(true, ordering: .relaxed)
        resetter.join()
    }

    @Test("Chains cached for receive go back exactly when the ring stops: a bad chain among them is used once, none is lost",
          arguments: [SimulatedQueue.Layout.split, .packed])
    func cachedChainsAroundABadOne(layout: SimulatedQueue.Layout) throws {
        let (device, driver, backend) = try makeDevice(layout: layout)
        let queue = driver.receiveQueues[0]
        let good1 = try #require(postReceiveChain(driver, segments: 1, segmentLength: 2048, indirect: false))
        let badBuffer = driver.guest.allocate(2048)
        let bad = try #require(queue.add([(badBuffer, 2048, false)]))  // readable: not a receive buffer
        let good2 = try #require(postReceiveChain(driver, segments: 1, segmentLength: 2048, indirect: false))
        #expect(device.poll())  // the engine caches chains ahead, waiting for frames
        var used = queue.takeUsed().map(\.head)

        // The ring stops (vhost-user GET_VRING_BASE) and starts again where the device says.
        let states = device.reset()
        let receiveBase = try #require(states.first { $0.index == 0 }).base
        let transmitBase = try #require(states.first { $0.index == 1 }).base
        try device.acknowledge(features: driver.features)
        try device.activate(memory: driver.guest.memory, queues: [
            QueueConfiguration(index: 0, size: queue.size, rings: queue.rings, base: receiveBase),
            QueueConfiguration(index: 1, size: driver.transmitQueues[0].size, rings: driver.transmitQueues[0].rings,
                               base: transmitBase),
        ], drive: .manual)
        for seed in 0..<2 { backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 1000, seed: UInt8(seed))) }
        #expect(driver.waitUntil { used += queue.takeUsed().map(\.head); return used.count >= 3 })
        #expect(used.sorted() == [good1, bad, good2].sorted(), "every chain used exactly once")
        #expect(device.queuePairCounters[0].receive.snapshot.frames == 2)
    }

    @Test("A kick eventfd in semaphore mode with a huge count wakes the worker once, not for ever")
    func semaphoreKickDoesNotSpin() throws {
        let backend = try LoopbackBackend()
        let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC), backend: backend)
        defer { device.reset() }
        let guest = try SimulatedGuestMemory()
        let receive = SimulatedQueue(guest: guest, size: 256, eventIndex: false)
        let transmit = SimulatedQueue(guest: guest, size: 256, eventIndex: false)
        guest.sealRingArea()
        let receiveKick = try EventFD(semaphore: true)
        let transmitKick = try EventFD()
        try device.acknowledge(features: [.version1])
        try device.activate(memory: guest.memory, queues: [
            QueueConfiguration(index: 0, size: 256, rings: receive.rings, kick: receiveKick, call: try EventFD()),
            QueueConfiguration(index: 1, size: 256, rings: transmit.rings, kick: transmitKick, call: try EventFD()),
        ])
        var huge = UInt64.max - 1
        #expect(withUnsafeBytes(of: &huge) { Glibc.write(receiveKick.rawValue, $0.baseAddress, 8) } == 8)
        let counters = device.queuePairCounters[0]
        #expect(eventually { counters.receive.kicks.current >= 1 })
        let kicksBefore = counters.receive.kicks.current
        // Twenty frames through the same worker, each waited for: every pass of the worker in between
        // would have counted another receive kick if the eventfd kept waking it.
        for number in 1...20 {
            let old = transmit.availableIndex
            let address = guest.allocate(100)
            guest.write(VirtioNetHeader().bytes + ethernetFrame(length: 88, seed: UInt8(number)), at: address)
            _ = transmit.add([(address, 100, false)])
            if transmit.needsKick(since: old) { try transmitKick.signal() }
            #expect(eventually { transmit.usedIndex == UInt16(number) })
            _ = transmit.takeUsed()
        }
        #expect(counters.receive.kicks.current == kicksBefore, "the worker woke for the receive kick again")
        #expect(counters.transmit.frames.current == 20)
    }
}

/// Polls `condition` (every 2 ms) until it holds or `timeout` seconds pass; returns whether it held.
func eventually(timeout: Double = 10, _ condition: () -> Bool) -> Bool {
    let deadline = SimulatedNetDriver.now() + timeout
    while true {
        if condition() { return true }
        if SimulatedNetDriver.now() > deadline { return false }
        _ = Glibc.poll(nil, 0, 2)
    }
}

@Suite("Guest memory taken away: a frontend that shrinks the file behind guest RAM")
struct GuestMemoryLossTests {
    @Test("The file shrinks under running rings: the device stops and needs a reset, the process and other devices go on")
    func fileShrinksUnderRunningRings() throws {
        let (device, driver, _) = try makeLoopbackDevice(threaded: true)
        defer { device.reset() }
        driver.postReceiveBuffers(count: 8)
        #expect(driver.transmit(ethernetFrame(length: 100)))
        #expect(driver.receive(count: 1).count == 1)

        // The frontend truncates guest RAM; the worker's next ring access faults.
        #expect(ftruncate(driver.guest.fds[0], 0) == 0)
        try driver.kicks[1]?.signal()
        #expect(eventually { device.needsReset }, "the device stopped using the memory")
        #expect(driver.guest.memory.faults > 0)

        // Another device in the same process is untouched.
        let (other, otherDriver, _) = try makeLoopbackDevice(threaded: true)
        defer { other.reset() }
        otherDriver.postReceiveBuffers(count: 8)
        let frame = ethernetFrame(length: 200, seed: 9)
        #expect(otherDriver.transmit(frame))
        #expect(otherDriver.receive(count: 1).map(\.frame) == [frame])
        #expect(!other.needsReset)
    }

    @Test("A region maps only the part of its file it covers, at any offset")
    func regionMapsOnlyWhatItCovers() throws {
        let fd = try MemFD.create(name: "sparse-guest-\(getpid())", size: 1 << 46)  // sparse: no memory used
        let offset: UInt64 = 1 << 45
        let region = try GuestMemoryRegion(
            description: MemoryRegionDescription(guestAddress: GuestAddress(0), size: 4 << 20, mmapOffset: offset + 4096), fd: fd.rawValue)
        #expect(region.mapping.length <= (4 << 20) + 4096, "mapped \(region.mapping.length) bytes for a 4 MiB region")
        let memory = try GuestMemory(regions: [region])
        try memory.writeBytes([1, 2, 3], to: GuestAddress(0))
        var check = [UInt8](repeating: 0, count: 3)
        #expect(pread(fd.rawValue, &check, 3, off_t(offset + 4096)) == 3)
        #expect(check == [1, 2, 3], "the region starts at its mmap offset in the file")
    }
}
