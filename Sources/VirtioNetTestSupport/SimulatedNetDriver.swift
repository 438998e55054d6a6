#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Sys
import VirtioNet
import Virtqueue

/// A frame as the guest received it.
public struct ReceivedFrame: Equatable, Sendable {
    public var header: VirtioNetHeader
    public var frame: [UInt8]
    /// How many receive buffers (chains) it took.
    public var buffers: Int
}

/// Plays a virtio-net guest driver against a `NetDevice`: negotiates, lays out the rings in shared
/// memory, sends frames, posts receive buffers, reads what comes back, and sends control commands.
public final class SimulatedNetDriver: @unchecked Sendable {
    public let guest: SimulatedGuestMemory
    public let device: NetDevice
    public let features: VirtioNetFeatures
    /// The header in front of every frame: 12 bytes, 10 for a legacy driver without mergeable buffers.
    public var headerSize: Int { VirtioNetHeader.size(for: features) }
    public let queuePairs: Int
    public let receiveQueues: [SimulatedQueue]
    public let transmitQueues: [SimulatedQueue]
    public let controlQueue: SimulatedQueue?
    /// Kick and call eventfds by virtqueue index.
    public let kicks: [Int: EventFD]
    public let calls: [Int: EventFD]
    /// Use indirect descriptor tables for every chain it adds.
    public var useIndirect = false
    /// Runs the device after the driver adds work. Polls it on this thread by default; with worker
    /// threads running the device, set it to nothing.
    public var drive: @Sendable (NetDevice) -> Void = { $0.poll() }

    /// Negotiates `wanted ∩ offered` (all offered by default), with the ring layout given (RING_PACKED
    /// follows it, whatever `wanted` says), and activates every queue.
    /// With `threaded`, the device runs its own worker threads and the driver only waits.
    public init(device: NetDevice, wanted: VirtioNetFeatures? = nil, queueSize: Int = 256, layout: SimulatedQueue.Layout = .split,
                guest: SimulatedGuestMemory? = nil, frontendAddresses: Bool = false, threaded: Bool = false) throws {
        let memory = try guest ?? SimulatedGuestMemory()
        self.guest = memory
        self.device = device
        var features = device.offeredFeatures.intersection(wanted ?? device.offeredFeatures)
        if layout == .packed {
            guard device.offeredFeatures.contains(.ringPacked) else { throw NetDeviceError.invalidConfiguration("packed rings not offered") }
            features.insert(.ringPacked)
        } else {
            features.remove(.ringPacked)
        }
        self.features = features
        try device.acknowledge(features: features)
        let pairs = features.contains(.mq) ? device.configuration.queuePairs : 1
        self.queuePairs = pairs
        let eventIndex = features.contains(.eventIndex)
        receiveQueues = (0..<pairs).map { _ in SimulatedQueue(guest: memory, size: queueSize, eventIndex: eventIndex, layout: layout) }
        transmitQueues = (0..<pairs).map { _ in SimulatedQueue(guest: memory, size: queueSize, eventIndex: eventIndex, layout: layout) }
        controlQueue = features.contains(.ctrlVQ) ? SimulatedQueue(guest: memory, size: 64, eventIndex: eventIndex, layout: layout) : nil
        self.guest.sealRingArea()

        var queues: [QueueConfiguration] = []
        var kicks: [Int: EventFD] = [:]
        var calls: [Int: EventFD] = [:]
        func configure(_ queue: SimulatedQueue, index: Int) throws {
            let kick = try EventFD()
            let call = try EventFD()
            kicks[index] = kick
            calls[index] = call
            queues.append(QueueConfiguration(index: index, size: queue.size,
                                             rings: frontendAddresses ? queue.frontendRings : queue.rings,
                                             kick: kick, call: call))
        }
        for pair in 0..<pairs {
            try configure(receiveQueues[pair], index: 2 * pair)
            try configure(transmitQueues[pair], index: 2 * pair + 1)
        }
        if let controlQueue { try configure(controlQueue, index: device.controlQueueIndex(features: features)) }
        self.kicks = kicks
        self.calls = calls
        if threaded { drive = { _ in } }
        try device.activate(memory: self.guest.memory, queues: queues, drive: threaded ? .workerThreads : .manual)
    }

    // MARK: Transmit

    /// Sends `frame` with `header` on queue pair `pair`. With `segmentSize`, the header and frame are
    /// spread over descriptors of that many bytes. Returns false if the ring is full.
    @discardableResult
    public func transmit(_ frame: [UInt8], header: VirtioNetHeader = VirtioNetHeader(), pair: Int = 0,
                         segmentSize: Int? = nil, indirect: Bool? = nil) -> Bool {
        let queue = transmitQueues[pair]
        let old = queue.availableIndex
        guard addTransmitChain(header.bytes.prefix(headerSize) + frame, to: queue, segmentSize: segmentSize, indirect: indirect ?? useIndirect, publish: true) else { return false }
        kick(queue: queue, index: 2 * pair + 1, since: old)
        return true
    }

    /// Makes all of `frames` available at once (one avail.idx store, at most one kick), so the device
    /// finds them together and handles them as one burst. Each frame is spread over descriptors of
    /// `segmentSize` bytes when it gives one. Returns false, adding nothing more, once the ring is full.
    @discardableResult
    public func transmitBurst(_ frames: [(frame: [UInt8], segmentSize: Int?)], pair: Int = 0) -> Bool {
        let queue = transmitQueues[pair]
        let old = queue.availableIndex
        var added = true
        for (frame, segmentSize) in frames {
            guard addTransmitChain(VirtioNetHeader().bytes.prefix(headerSize) + frame, to: queue, segmentSize: segmentSize, indirect: useIndirect, publish: false) else {
                added = false
                break
            }
        }
        queue.publishAvailable()
        kick(queue: queue, index: 2 * pair + 1, since: old)
        return added
    }

    /// Copies `bytes` (header and frame) into guest memory and adds them to `queue` as one chain of
    /// readable descriptors of `segmentSize` bytes (one descriptor without it).
    private func addTransmitChain(_ bytes: [UInt8], to queue: SimulatedQueue, segmentSize: Int?, indirect: Bool, publish: Bool) -> Bool {
        let address = guest.allocate(bytes.count)
        guest.write(bytes, at: address)
        let step = segmentSize ?? bytes.count
        let segments = stride(from: 0, to: bytes.count, by: step).map { offset in
            (address: GuestAddress(address.rawValue + UInt64(offset)), length: UInt32(min(step, bytes.count - offset)), writable: false)
        }
        return queue.add(segments, indirect: indirect, publish: publish) != nil
    }

    /// Used entries of transmitted chains since the last call.
    public func completedTransmits(pair: Int = 0) -> [(head: UInt16, length: UInt32)] {
        transmitQueues[pair].takeUsed()
    }

    // MARK: Receive

    /// Posts `count` receive buffers of `size` bytes each, each split over `segments` descriptors.
    public func postReceiveBuffers(pair: Int = 0, count: Int, size: Int = 2048, segments: Int = 1) {
        let queue = receiveQueues[pair]
        let old = queue.availableIndex
        for _ in 0..<count {
            let address = guest.allocate(size)
            let piece = size / segments
            var chain: [(address: GuestAddress, length: UInt32, writable: Bool)] = []
            for index in 0..<segments {
                let length = index == segments - 1 ? size - piece * (segments - 1) : piece
                chain.append((GuestAddress(address.rawValue + UInt64(index * piece)), UInt32(length), true))
            }
            guard queue.add(chain, indirect: useIndirect, publish: false) != nil else { break }
        }
        queue.publishAvailable()
        kick(queue: queue, index: 2 * pair, since: old)
    }

    /// Frames the device has delivered since the last call, reassembled across mergeable buffers.
    public func receivedFrames(pair: Int = 0) -> [ReceivedFrame] {
        let queue = receiveQueues[pair]
        var pieces: [[UInt8]] = []
        for used in queue.takeUsed() {
            var data: [UInt8] = []
            var remaining = Int(used.length)
            for (address, length) in queue.buffers[used.head] ?? [] {
                guard remaining > 0 else { break }
                let take = min(Int(length), remaining)
                data += guest.read(address, count: take)
                remaining -= take
            }
            pieces.append(data)
        }
        var frames: [ReceivedFrame] = []
        var index = 0
        while index < pieces.count {
            guard pieces[index].count >= headerSize else { index += 1; continue }
            // A 10-byte legacy header has no num_buffers: read as zero.
            let header = VirtioNetHeader(Array(pieces[index][0..<headerSize]) + [UInt8](repeating: 0, count: VirtioNetHeader.size - headerSize))
            let count = features.contains(.mergeableRxBuffers) ? max(1, Int(header.numBuffers)) : 1
            var frame = Array(pieces[index][headerSize...])
            for next in pieces[(index + 1)..<min(index + count, pieces.count)] { frame += next }
            frames.append(ReceivedFrame(header: header, frame: frame, buffers: count))
            index += count
        }
        return frames
    }

    // MARK: Control queue

    /// Sends one control command and returns the ack byte (nil if the device never answered).
    public func control(class controlClass: UInt8, command: UInt8, data: [UInt8]) -> UInt8? {
        guard let queue = controlQueue else { return nil }
        let request = [controlClass, command] + data
        let address = guest.allocate(request.count)
        guest.write(request, at: address)
        let ack = guest.allocate(1)
        guest.write([0xee], at: ack)
        let old = queue.availableIndex
        guard queue.add([(address, UInt32(request.count), false), (ack, 1, true)], indirect: useIndirect) != nil else { return nil }
        kick(queue: queue, index: device.controlQueueIndex(features: features), since: old)
        let answered = waitUntil { queue.usedIndex == queue.availableIndex }
        _ = queue.takeUsed()
        return answered ? guest.read(ack, count: 1)[0] : nil
    }

    // MARK: Driving and waiting

    /// Kicks the device if the ring's notification state asks for it, then lets the device run.
    public func kick(queue: SimulatedQueue, index: Int, since old: UInt16) {
        if queue.needsKick(since: old) { try? kicks[index]?.signal() }
        drive(device)
    }

    /// Runs the device until `condition` holds or `timeout` seconds pass. Returns whether it held.
    @discardableResult
    public func waitUntil(timeout: Double = 10, _ condition: () -> Bool) -> Bool {
        let deadline = Self.now() + timeout
        while true {
            drive(device)
            if condition() { return true }
            if Self.now() > deadline { return false }
            // Wake on any interrupt from the device, or re-check soon: no fixed sleep decides a result.
            var descriptors = calls.values.map { pollfd(fd: $0.rawValue, events: Int16(POLLIN), revents: 0) }
            _ = Glibc.poll(&descriptors, nfds_t(descriptors.count), 5)
            for call in calls.values { _ = try? call.drain() }
        }
    }

    /// Waits for `count` frames on `pair` and returns those that came.
    public func receive(count: Int, pair: Int = 0, timeout: Double = 10) -> [ReceivedFrame] {
        var frames: [ReceivedFrame] = []
        waitUntil(timeout: timeout) {
            frames += receivedFrames(pair: pair)
            return frames.count >= count
        }
        return frames
    }

    public static func now() -> Double {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
    }
}
