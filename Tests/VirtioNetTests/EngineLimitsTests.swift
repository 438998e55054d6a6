import GuestMemory
import Logging
import Testing
import VirtioNet
import VirtioNetTestSupport
import Virtqueue

/// A small deterministic generator (SplitMix64), so every case can be replayed from its seed.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Every combination of the features that change how the engines lay frames into buffers.
struct FeatureCombination: CustomTestStringConvertible, Sendable {
    var mergeable: Bool
    var gso: Bool
    var indirect: Bool
    var eventIndex: Bool
    var packed: Bool
    var testDescription: String {
        "mrg_rxbuf=\(mergeable) gso=\(gso) indirect=\(indirect) event_idx=\(eventIndex) \(packed ? "packed" : "split")"
    }
    var layout: SimulatedQueue.Layout { packed ? .packed : .split }
    var without: VirtioNetFeatures {
        var without: VirtioNetFeatures = []
        if !mergeable { without.insert(.mergeableRxBuffers) }
        if !gso { without.formUnion([.guestTSO4, .guestTSO6, .guestECN, .guestUFO, .guestUSO4, .guestUSO6]) }
        if !eventIndex { without.insert(.eventIndex) }
        return without
    }
    static let all: [FeatureCombination] = (0..<32).map {
        FeatureCombination(mergeable: $0 & 1 != 0, gso: $0 & 2 != 0, indirect: $0 & 4 != 0, eventIndex: $0 & 8 != 0, packed: $0 & 16 != 0)
    }
}

/// A device whose MTU allows the largest frame with and without GSO, rings up to 32768.
private func makeDevice(_ combination: FeatureCombination, queueSize: Int) throws -> (NetDevice, SimulatedNetDriver, LoopbackBackend) {
    let backend = try LoopbackBackend()
    let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC, mtu: 65535, maximumQueueSize: 32768), backend: backend,
        logger: quietLogger)
    let driver = try SimulatedNetDriver(device: device, wanted: device.offeredFeatures.subtracting(combination.without),
                                        queueSize: queueSize, layout: combination.layout, guest: try SimulatedGuestMemory(regionSize: 24 << 20))
    driver.useIndirect = combination.indirect
    return (device, driver, backend)
}

@Suite("Engine limits at their edges, and frames of every size against buffers of every size")
struct EngineLimitsTests {
    static let segmentLimit = SplitQueue.maximumSegmentsPerChain
    /// The largest frame a backend hands over, vnet header included: the bounce buffer's size.
    static let largestFrame = 65535 + 14 + 4 + VirtioNetHeader.size

    /// Frames from 14 B to 64 KiB against receive chains of buffers from 1 B up, in every feature
    /// combination and with rings of 1024 and 32768: a frame arrives whole exactly when the buffers
    /// one read can reach hold it, with num_buffers right; otherwise it is not delivered (dropped or
    /// waiting), and nothing else happens.
    @Test(arguments: FeatureCombination.all, [1024, 32768])
    func framesAgainstBuffers(combination: FeatureCombination, queueSize: Int) throws {
        var random = SeededGenerator(seed: UInt64(queueSize) &* 31 &+ UInt64(combination.testDescription.hashValue & 0xffff))
        let sizes = [14, 60, 1514, 65535 + 18] + (0..<6).map { _ in Int.random(in: 14...(65535 + 18), using: &random) }
        for (number, frameLength) in sizes.enumerated() {
            let (device, driver, backend) = try makeDevice(combination, queueSize: queueSize)
            defer { device.reset() }
            // Chains of 1 to 1100 descriptors of 1 B to 4 KiB, descriptors within the ring's table
            // unless indirect, at most 2 MiB in all.
            var chains: [[Int]] = []
            var descriptorsLeft = combination.indirect ? Int.max : queueSize
            var bytesLeft = 2 << 20
            while chains.count < 64 {
                let shape = Int.random(in: 0..<4, using: &random)
                let count = shape == 0 ? Int.random(in: 1...3, using: &random) : shape == 1 ? Int.random(in: 1000...1100, using: &random)
                    : Int.random(in: 1...40, using: &random)
                let largest = [1, 16, 1500, 4096][Int.random(in: 0..<4, using: &random)]
                let chain = (0..<count).map { _ in Int.random(in: 1...largest, using: &random) }
                guard count <= descriptorsLeft, chain.reduce(0, +) <= bytesLeft, count <= queueSize || combination.indirect else { break }
                descriptorsLeft -= count
                bytesLeft -= chain.reduce(0, +)
                chains.append(chain)
            }
            let queue = driver.receiveQueues[0]
            let old = queue.availableIndex
            for chain in chains {
                var segments: [(address: GuestAddress, length: UInt32, writable: Bool)] = []
                for length in chain { segments.append((driver.guest.allocate(length, alignment: 1), UInt32(length), true)) }
                try #require(queue.add(segments, indirect: combination.indirect, publish: false) != nil)
            }
            queue.publishAvailable()
            let frame = ethernetFrame(length: frameLength, seed: UInt8(truncatingIfNeeded: number))
            backend.inject(queue: 0, frame: VirtioNetHeader().bytes + frame)
            driver.kick(queue: queue, index: 0, since: old)
            device.poll()

            // What one read can reach: bad chains (under 12 bytes, over 1 MiB or over the segment limit) at the
            // front are given back; then chains in ring order while they take at most the segment
            // limit, up to the next bad chain (mergeable), or the first good chain alone.
            let needed = frameLength + VirtioNetHeader.size
            func isGood(_ chain: [Int]) -> Bool {
                let bytes = chain.reduce(0, +)
                return chain.count <= Self.segmentLimit && bytes >= VirtioNetHeader.size && bytes <= Int(SplitQueue.defaultMaximumChainLength)
            }
            let usable = chains.drop { !isGood($0) }
            var reachable: [Int] = []
            var segments = 0
            for chain in usable {
                guard isGood(chain), segments + chain.count <= Self.segmentLimit else { break }
                segments += chain.count
                reachable.append(chain.reduce(0, +))
                if !combination.mergeable { break }
            }
            let fits = reachable.reduce(0, +) >= needed
            let received = driver.receivedFrames()
            let context = "\(combination.testDescription) ring \(queueSize) frame \(frameLength) chains \(chains.map(\.count)) reachable \(reachable)"
            if fits {
                #expect(received.count == 1, "\(context)")
                let intact = received.first?.frame == frame
                #expect(intact, "\(context)")
                var buffers = 0, capacity = 0
                while capacity < needed { capacity += reachable[buffers]; buffers += 1 }
                #expect(received.first.map { Int($0.header.numBuffers) } == (combination.mergeable ? buffers : 1), "\(context)")
            } else {
                #expect(received.isEmpty, "\(context)")
            }
            let counters = device.queuePairCounters[0].receive.snapshot
            #expect(counters.frames == (fits ? 1 : 0), "\(context)")
            #expect(counters.drops[.tooLarge, default: 0] <= (fits ? 0 : 1), "\(context)")
        }
    }

    /// Frames from 14 B to 64 KiB sent in descriptors of 1 B up: a chain within the segment limit
    /// goes out whole; one past it is refused and counted; the next frame goes either way.
    @Test(arguments: FeatureCombination.all.filter { !$0.mergeable && !$0.gso })
    func transmitFramesAgainstDescriptors(combination: FeatureCombination) throws {
        var random = SeededGenerator(seed: 0x7a11 &+ UInt64(combination.indirect ? 1 : 0) &+ UInt64(combination.eventIndex ? 2 : 0))
        let (device, driver, backend) = try makeDevice(combination, queueSize: 4096)
        defer { device.reset() }
        var expectedDrops = 0
        for number in 0..<24 {
            let length = [14, 60, 65535 + 18, Int.random(in: 14...(65535 + 18), using: &random)][number % 4]
            let bytes = length + VirtioNetHeader.size
            let segmentSize = [1, 64, Int.random(in: 1...4096, using: &random), bytes][Int.random(in: 0..<4, using: &random)]
            let segments = (bytes + segmentSize - 1) / segmentSize
            guard segments <= (combination.indirect ? 32768 : 4096) else { continue }
            let frame = ethernetFrame(length: length, seed: UInt8(truncatingIfNeeded: number))
            #expect(driver.transmit(frame, segmentSize: segmentSize))
            #expect(driver.waitUntil { driver.transmitQueues[0].usedIndex == driver.transmitQueues[0].availableIndex })
            _ = driver.completedTransmits()
            let sent = backend.drain(queue: 0)
            if segments <= Self.segmentLimit {
                let intact = sent.map { Array($0.dropFirst(VirtioNetHeader.size)) } == [frame]
                #expect(intact, "\(length) bytes in \(segments) descriptors of \(segmentSize)")
            } else {
                expectedDrops += 1
                #expect(sent.isEmpty, "\(length) bytes in \(segments) descriptors of \(segmentSize)")
            }
            #expect(device.queuePairCounters[0].transmit.snapshot.drops[.badChain, default: 0] == UInt64(expectedDrops))
        }
    }

    @Test("The bounce buffer holds exactly the largest frame: that size waits for buffers and arrives, one byte more is dropped",
          arguments: [false, true])
    func bounceBufferAtItsEdge(packed: Bool) throws {
        let combination = FeatureCombination(mergeable: true, gso: true, indirect: true, eventIndex: true, packed: packed)
        for (extra, delivered) in [(0, true), (1, false)] {
            let (device, driver, backend) = try makeDevice(combination, queueSize: 256)
            defer { device.reset() }
            // Too little posted for the largest frame: it is read into the bounce buffer and waits.
            driver.postReceiveBuffers(count: 4, size: 4096)
            let frame = ethernetFrame(length: Self.largestFrame - VirtioNetHeader.size + extra, seed: 7)
            backend.inject(queue: 0, frame: VirtioNetHeader().bytes + frame)
            device.poll()
            #expect(driver.receivedFrames().isEmpty)
            #expect(backend.pendingFrames(queue: 0) == 0, "read from the backend")
            driver.postReceiveBuffers(count: 16, size: 4096)
            device.poll()
            let received = driver.receivedFrames()
            #expect(received.count == (delivered ? 1 : 0), "extra \(extra)")
            if delivered {
                let intact = received.first?.frame == frame
                #expect(intact)
                #expect(received.first?.buffers == 17)
            } else {
                #expect(device.queuePairCounters[0].receive.snapshot.drops[.tooLarge] == 1)
            }
        }
    }

    @Test("The receive cache at its edge: a ring of 1024 one-segment buffers holds a frame that needs all 1024; one byte more can never fit",
          arguments: [false, true])
    func receiveCacheAtItsEdge(packed: Bool) throws {
        let combination = FeatureCombination(mergeable: true, gso: true, indirect: false, eventIndex: true, packed: packed)
        for (extra, delivered) in [(0, true), (1, false)] {
            let (device, driver, backend) = try makeDevice(combination, queueSize: 1024)
            defer { device.reset() }
            driver.postReceiveBuffers(count: 1024, size: 64)
            let frame = ethernetFrame(length: 1024 * 64 - VirtioNetHeader.size + extra, seed: 3)
            backend.inject(queue: 0, frame: VirtioNetHeader().bytes + frame)
            device.poll()
            let received = driver.receivedFrames()
            #expect(received.count == (delivered ? 1 : 0), "extra \(extra)")
            if delivered {
                #expect(received.first?.buffers == 1024)
                let intact = received.first?.frame == frame
                #expect(intact)
            } else {
                #expect(device.queuePairCounters[0].receive.snapshot.drops[.tooLarge] == 1, "a frame that can never fit is dropped")
            }
        }
    }

    @Test("A buffer that crosses a memory region boundary takes two segments: 1024 in all is a chain at the limit, 1025 is refused",
          arguments: [false, true], [SimulatedQueue.Layout.split, .packed])
    func segmentsAcrossRegions(indirect: Bool, layout: SimulatedQueue.Layout) throws {
        let backend = try LoopbackBackend()
        let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC, mtu: 65535, maximumQueueSize: 4096), backend: backend)
        let guest = try SimulatedGuestMemory(regionSize: 8 << 20, regionCount: 2)
        let driver = try SimulatedNetDriver(device: device, queueSize: 4096, layout: layout, guest: guest)
        defer { device.reset() }
        let boundary = guest.base.rawValue + (8 << 20)
        for (descriptors, accepted) in [(Self.segmentLimit - 1, true), (Self.segmentLimit, false)] {
            // One 64-byte buffer straddling the boundary, then one-segment buffers.
            var segments: [(address: GuestAddress, length: UInt32, writable: Bool)] = [(GuestAddress(boundary - 32), 64, true)]
            for _ in 1..<descriptors { segments.append((guest.allocate(64), 64, true)) }
            let queue = driver.receiveQueues[0]
            let old = queue.availableIndex
            try #require(queue.add(segments, indirect: indirect) != nil)
            driver.kick(queue: queue, index: 0, since: old)
            let frame = ethernetFrame(length: 1000, seed: 1)
            backend.inject(queue: 0, frame: VirtioNetHeader().bytes + frame)
            if !accepted { driver.postReceiveBuffers(count: 1, size: 70000, segments: 18) }
            device.poll()
            let received = driver.receivedFrames()
            let intact = received.map(\.frame) == [frame]
            #expect(intact, "\(descriptors) descriptors, \(descriptors + 1) segments")
            #expect(device.queuePairCounters[0].receive.snapshot.drops[.badChain, default: 0] == (accepted ? 0 : 1))
        }
    }

    @Test("The control queue takes commands of up to 256 segments; one more is refused",
          arguments: [false, true], [SimulatedQueue.Layout.split, .packed])
    func controlSegmentsAtTheLimit(indirect: Bool, layout: SimulatedQueue.Layout) throws {
        let (device, driver, _) = try makeLoopbackDevice(queuePairs: 2, layout: layout)
        defer { device.reset() }
        let queue = try #require(driver.controlQueue)
        for (readable, accepted) in [(255, true), (256, false)] {
            // A command one byte per descriptor: class 4 (MQ), command 0 (VQ_PAIRS_SET), then data.
            var bytes = [UInt8](repeating: 0, count: readable)
            bytes[0] = 4  // class: MQ
            bytes[1] = 0  // command: VQ_PAIRS_SET
            bytes[readable - 2] = 2
            var segments: [(address: GuestAddress, length: UInt32, writable: Bool)] = []
            for byte in bytes {
                let address = driver.guest.allocate(1, alignment: 1)
                driver.guest.write([byte], at: address)
                segments.append((address, 1, false))
            }
            let ack = driver.guest.allocate(1)
            driver.guest.write([0xee], at: ack)
            segments.append((ack, 1, true))
            let old = queue.availableIndex
            try #require(queue.add(segments, indirect: indirect || readable + 1 > queue.freeDescriptors) != nil)
            driver.kick(queue: queue, index: device.controlQueueIndex(features: driver.features), since: old)
            #expect(driver.waitUntil { queue.usedIndex == queue.availableIndex })
            _ = queue.takeUsed()
            let answer = driver.guest.read(ack, count: 1)[0]
            // A command of 255 readable bytes carries 253 bytes of data: the device refuses the
            // length (VIRTIO_NET_ERR) but answers; one segment more is a chain it cannot take at all.
            #expect(accepted ? answer != 0xee : answer == 0xee, "\(readable + 1) segments: ack \(answer)")
            #expect(device.controlCounters.snapshot.drops[.badChain, default: 0] == (accepted ? 0 : 1))
        }
    }

    @Test("Transmit bursts at their edges: 64 frames and 65; four chains of 1024 segments fill the iovec array, a fifth waits for the next burst",
          arguments: [SimulatedQueue.Layout.split, .packed])
    func transmitBurstEdges(layout: SimulatedQueue.Layout) throws {
        for count in [64, 65] {
            let (device, driver, backend) = try makeLoopbackDevice(mtu: 65535, layout: layout)
            defer { device.reset() }
            let frames = (0..<count).map { ethernetFrame(length: 60 + $0, seed: UInt8($0)) }
            #expect(driver.transmitBurst(frames.map { (frame: $0, segmentSize: Int?.none) }))
            let sent = backend.drain(queue: 0).map { Array($0.dropFirst(VirtioNetHeader.size)) }
            let inOrder = sent == frames
            #expect(inOrder, "\(count) frames: \(sent.count) sent")
        }
        let (device, driver, backend) = try makeLoopbackDevice(mtu: 65535, queueSize: 256, layout: layout)
        defer { device.reset() }
        driver.useIndirect = true
        let frames = (0..<5).map { ethernetFrame(length: Self.segmentLimit * 64 - VirtioNetHeader.size, seed: UInt8(40 + $0)) }
        #expect(driver.transmitBurst(frames.map { (frame: $0, segmentSize: 64) }))
        let sent = backend.drain(queue: 0).map { Array($0.dropFirst(VirtioNetHeader.size)) }
        #expect(sent.count == 5)
        let inOrder = sent == frames
        #expect(inOrder)
        #expect(device.queuePairCounters[0].transmit.snapshot.drops.values.allSatisfy { $0 == 0 })
    }
}
