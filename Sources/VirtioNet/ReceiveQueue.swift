#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Logging
import Synchronization
import Sys
import Virtqueue

/// The receive filter and the device's MAC, shared between the control queue (writer) and the
/// receive workers (readers, who copy it only when `generation` moves).
final class FilterCell: Sendable {
    private let state: Mutex<(filter: ReceiveFilter, mac: MACAddress)>
    let generation = Atomic<UInt64>(0)

    init(mac: MACAddress) { state = Mutex((ReceiveFilter(), mac)) }

    func update(_ body: (inout ReceiveFilter, inout MACAddress) -> Void) {
        state.withLock { body(&$0.filter, &$0.mac) }
        generation.add(1, ordering: .releasing)
    }

    var current: (filter: ReceiveFilter, mac: MACAddress) { state.withLock { $0 } }
}

/// The backend-to-guest side of one queue pair. Owned by one thread at a time (its worker).
///
/// Frames are read straight into the guest's buffers. Chains are popped ahead into a cache until they
/// can hold the largest frame that may arrive, so the read never needs to know the frame's size;
/// chains a frame did not use stay cached for the next one. Only when the guest has posted too little
/// for the largest frame does a frame land in a bounce buffer first, to be copied once it fits.
///
/// The cache is always the last chains popped, in ring order, and never spans more segments than one
/// read takes: a chain that would pass that, or a bad chain behind cached ones, is put back and waits
/// until the cache drains. So a stopped ring gives back exactly the cached chains, and a frame that
/// cannot fit in what the cache can ever hold is dropped instead of waited for.
final class ReceiveQueue<Ring: DeviceQueue>: ReceiveEngine, @unchecked Sendable {
    // One worker thread at a time owns an engine, so its state opts out of dynamic exclusivity
    // checks, which cost about a third of the per-frame instructions (measured with callgrind).
    @exclusivity(unchecked) private(set) var ring: Ring
    let index: Int
    let backendQueue: Int
    let call: EventFD?
    let counters: QueueCounters
    let mergeable: Bool
    /// Bytes of guest buffers wanted before reading: the largest frame the backend can deliver.
    let targetCapacity: Int
    /// The header in front of each frame: 12 bytes, or 10 for a legacy driver without mergeable buffers.
    let headerSize: Int
    /// Whether the header has `num_buffers` (all but the 10-byte legacy one).
    let hasNumBuffers: Bool
    private let filterCell: FilterCell
    @exclusivity(unchecked) private var filterGeneration: UInt64 = .max
    @exclusivity(unchecked) private var filter = ReceiveFilter()
    @exclusivity(unchecked) private var mac: MACAddress
    private let logger: Logger
    @exclusivity(unchecked) private var faultsLogged = 0
    /// Dirty logging (live migration): the frames written into guest buffers and the used ring.
    private let logging: DirtyLogging

    /// Popped chains not yet used, oldest first. Their iovecs are contiguous in `iovecs` from `window`.
    private struct CachedChain {
        var head: ChainHead
        var iovecEnd: Int
        var capacity: Int
    }
    /// The cache's iovecs from `window`, then room for one more chain: at most `segmentLimit` live
    /// ones (what one read takes), so compacting always makes room.
    @exclusivity(unchecked) private var iovecs: IOVecArray
    @exclusivity(unchecked) private var window = 0
    private let cache: UnsafeMutablePointer<CachedChain>
    private let cacheCapacity: Int
    @exclusivity(unchecked) private var cacheFirst = 0
    @exclusivity(unchecked) private var cacheCount = 0
    @exclusivity(unchecked) private var cachedBytes = 0
    /// The next chain was put back (it would take the cache past one read's segments, or it is bad):
    /// the cache cannot grow until a frame consumes some of it.
    @exclusivity(unchecked) private var cacheClosed = false
    private static var segmentLimit: Int { SplitQueue.maximumSegmentsPerChain }

    private let bounce: UnsafeMutableRawBufferPointer
    private let bounceVector: UnsafeMutablePointer<iovec>
    @exclusivity(unchecked) private var bouncedLength = 0

    init(index: Int, backendQueue: Int, ring: Ring, call: EventFD?, counters: QueueCounters,
         features: VirtioNetFeatures, mtu: Int, filter: FilterCell, logger: Logger, logging: DirtyLogging = DirtyLogging()) {
        self.logging = logging
        self.index = index
        self.backendQueue = backendQueue
        self.ring = ring
        self.call = call
        self.counters = counters
        self.mergeable = features.contains(.mergeableRxBuffers)
        let gso: VirtioNetFeatures = [.guestTSO4, .guestTSO6, .guestUFO, .guestUSO4, .guestUSO6]
        self.headerSize = VirtioNetHeader.size(for: features)
        self.hasNumBuffers = headerSize == VirtioNetHeader.size
        self.targetCapacity = features.isDisjoint(with: gso)
            ? mtu + 14 + 4 + headerSize
            : EngineLimits.largestReceiveFrame
        self.filterCell = filter
        self.mac = filter.current.mac
        self.logger = logger
        self.cacheCapacity = ring.entries
        self.cache = .allocate(capacity: cacheCapacity)
        self.iovecs = IOVecArray(capacity: 4 * Self.segmentLimit)
        self.bounce = .allocate(byteCount: EngineLimits.largestReceiveFrame, alignment: 16)
        self.bounceVector = .allocate(capacity: 1)
        bounceVector.initialize(to: iovec(iov_base: bounce.baseAddress, iov_len: bounce.count))
    }

    deinit {
        cache.deallocate()
        bounce.deallocate()
        bounceVector.deallocate()
    }

    /// Where the queue stands (after `returnCachedChains()`, where it resumes).
    var base: UInt32 { ring.base }

    /// Gives cached chains back to the ring (before a stop) so that GET_VRING_BASE reports them unused.
    func returnCachedChains() {
        ring.undoPop(cacheCount)
        cacheCount = 0
        cacheFirst = 0
        cachedBytes = 0
        cacheClosed = false
        iovecs.removeAll()
        window = 0
        if bouncedLength > 0 {
            counters.countDrop(.tooLarge)
            bouncedLength = 0
        }
    }

    /// Moves up to `budget` frames from the backend into the guest's buffers; bad chains the guest
    /// posted count against the budget too, so a pass always ends.
    func process<Backend: PacketBackend>(backend: Backend, budget: Int) -> QueuePassResult {
        refreshFilter()
        var unpublished = 0
        var frames = 0
        var bytes = 0
        var result = QueuePassResult.budgetExhausted
        var handled = 0
        while handled < budget {
            let refilled = refill(handled: &handled, budget: budget, unpublished: &unpublished)
            if case .broken(let fault) = refilled {
                result = .broken(fault)
                break
            }
            if handled >= budget { break }
            // The cache holds all it ever can for the frame at its front: the guest posted everything,
            // or the next chain waits behind the cache.
            let cacheIsFinal = cacheClosed || cacheCount == cacheCapacity
            if bouncedLength > 0 {
                // A frame waits for room; it is the next one the guest must see.
                if cachedBytes >= bouncedLength {
                    let length = bouncedLength
                    _ = IOVec.copyIn(UnsafeRawBufferPointer(rebasing: bounce[0..<length]), to: UnsafeBufferPointer(windowIOVecs(chains: cacheCount)), at: 0)
                    bouncedLength = 0
                    complete(length: length, unpublished: &unpublished)
                    frames += 1
                    bytes += length - headerSize
                } else if cacheIsFinal {
                    counters.countDrop(.tooLarge)
                    bouncedLength = 0
                } else {
                    result = .blocked
                    break
                }
                handled += 1
            } else {
                guard cacheCount > 0 else { result = .blocked; break }
                let direct = mergeable ? cachedBytes >= targetCapacity : cache[cacheFirst].capacity >= targetCapacity
                let outcome: ReceiveOutcome
                if direct {
                    outcome = backend.receive(queue: backendQueue, into: UnsafeBufferPointer(windowIOVecs(chains: mergeable ? cacheCount : 1)))
                } else {
                    outcome = backend.receive(queue: backendQueue, into: UnsafeBufferPointer(start: bounceVector, count: 1))
                }
                switch outcome {
                case .empty:
                    result = .idle
                case .dropped:
                    counters.countDrop(.tooLarge)
                    handled += 1
                    continue
                case .received(let length):
                    handled += 1
                    guard length >= headerSize + 14 else {
                        counters.countDrop(.backend)
                        continue
                    }
                    guard accepts(frameIn: direct) else {
                        counters.countDrop(.filtered)
                        continue
                    }
                    if direct {
                        complete(length: length, unpublished: &unpublished)
                        frames += 1
                        bytes += length - headerSize
                    } else {
                        let fits = mergeable ? cachedBytes >= length : cache[cacheFirst].capacity >= length
                        if fits || (mergeable && !cacheIsFinal) {
                            // Delivered now if it fits, else as soon as the guest posts enough.
                            bouncedLength = length
                            handled -= 1  // counted when delivered
                        } else {
                            counters.countDrop(.tooLarge)
                        }
                    }
                }
                if case .idle = result { break }
            }
            if unpublished >= EngineLimits.burst {
                publish()
                unpublished = 0
            }
        }
        if unpublished > 0 { publish() }
        counters.addFrames(frames, bytes: bytes)
        return result
    }

    /// Pops chains until the cache holds `targetCapacity` bytes (one chain without mergeable buffers
    /// is enough if it is big enough), the ring is empty, or the cache is closed. Bad chains are given
    /// back as used with length 0 and count against the budget; behind cached chains they wait.
    @inline(__always)
    private func refill(handled: inout Int, budget: Int, unpublished: inout Int) -> RefillOutcome {
        while cacheCount < cacheCapacity && !cacheClosed {
            if mergeable ? cachedBytes >= max(targetCapacity, bouncedLength) : cacheCount > 0 { break }
            guard handled < budget else { return .budgetExhausted }
            if iovecs.capacity - iovecs.count < Self.segmentLimit { compact() }
            let start = iovecs.count
            let chain: DescriptorChain
            do throws(VirtqueueError) {
                guard let popped = try ring.popChain(into: &iovecs) else { break }
                chain = popped
            } catch {
                switch error {
                case .badChain(let head, let fault):
                    guard refuse(head: head, fault, handled: &handled, unpublished: &unpublished) else { return .ready }
                    continue
                case .broken(let fault):
                    return .broken(fault)
                }
            }
            guard chain.readable.isEmpty, chain.writableLength >= UInt32(headerSize) else {
                iovecs.count = start
                let why = chain.readable.isEmpty ? "buffer shorter than the header" : "readable descriptor in a receive chain"
                guard refuse(head: chain.head, why, handled: &handled, unpublished: &unpublished) else { return .ready }
                continue
            }
            if cacheCount > 0 && iovecs.count - window > Self.segmentLimit {
                // One read could not reach this chain's buffers: it waits for the cache to drain.
                iovecs.count = start
                ring.undoPop(1)
                cacheClosed = true
                break
            }
            cache[(cacheFirst + cacheCount) % cacheCapacity] = CachedChain(head: chain.head, iovecEnd: iovecs.count, capacity: Int(chain.writableLength))
            cacheCount += 1
            cachedBytes += Int(chain.writableLength)
        }
        return .ready
    }

    private enum RefillOutcome {
        case ready
        case budgetExhausted
        case broken(QueueFault)
    }

    /// A bad chain the refill popped: given back used at once when nothing is cached (counting
    /// against the budget; true), else put back, closing the cache, to wait behind the cached
    /// chains that a stopped ring must be able to give back (false).
    private func refuse(head: ChainHead, _ why: Any, handled: inout Int, unpublished: inout Int) -> Bool {
        if cacheCount > 0 {
            ring.undoPop(1)
            cacheClosed = true
            return false
        }
        drop(head: head, why)
        unpublished += 1
        handled += 1
        return true
    }

    /// Moves the live iovecs (at most `segmentLimit`) to the front of the array.
    private func compact() {
        guard window > 0 else { return }
        let live = iovecs.count - window
        iovecs.base.update(from: iovecs.base + window, count: live)
        for offset in 0..<cacheCount {
            cache[(cacheFirst + offset) % cacheCapacity].iovecEnd -= window
        }
        iovecs.count = live
        window = 0
    }

    /// The iovecs of the first `chains` cached chains (never more than one read takes).
    @inline(__always)
    private func windowIOVecs(chains: Int) -> UnsafeMutableBufferPointer<iovec> {
        let end = cache[(cacheFirst + chains - 1) % cacheCapacity].iovecEnd
        return iovecs.buffer(window..<end)
    }

    /// Hands `length` bytes, already in the first cached chains, to the guest.
    private func complete(length: Int, unpublished: inout Int) {
        var remaining = length
        var used = 0
        var firstChainIOVecs = 0..<0
        while remaining > 0 && used < cacheCount {
            let chain = cache[(cacheFirst + used) % cacheCapacity]
            if used == 0 { firstChainIOVecs = window..<chain.iovecEnd }
            let taken = min(chain.capacity, remaining)
            ring.addUsed(head: chain.head, length: UInt32(taken))
            remaining -= taken
            cachedBytes -= chain.capacity
            used += 1
            if !mergeable { break }
        }
        // num_buffers (header offset 10): the kernel leaves it alone, the driver relies on it. The
        // 10-byte legacy header has none: those bytes are the frame's.
        if hasNumBuffers {
            var numBuffers = UInt16(truncatingIfNeeded: used).littleEndian
            withUnsafeBytes(of: &numBuffers) { bytes in
                _ = IOVec.copyIn(bytes, to: UnsafeBufferPointer(iovecs.buffer(firstChainIOVecs)), at: 10)
            }
        }
        if logging.isEnabled { logWrite(length) }
        window = cache[(cacheFirst + used - 1) % cacheCapacity].iovecEnd
        cacheFirst = (cacheFirst + used) % cacheCapacity
        cacheCount -= used
        cacheClosed = false
        if cacheCount == 0 {
            iovecs.removeAll()
            window = 0
        }
        unpublished += used
    }

    private func refreshFilter() {
        let generation = filterCell.generation.load(ordering: .acquiring)
        guard generation != filterGeneration else { return }
        (filter, mac) = filterCell.current
        filterGeneration = generation
    }

    /// Applies the receive filter to the frame just read (in the guest's buffers or the bounce buffer).
    private func accepts(frameIn guestBuffers: Bool) -> Bool {
        if filter.promiscuous { return true }
        var destination = (UInt8(0), UInt8(0), UInt8(0), UInt8(0), UInt8(0), UInt8(0))
        withUnsafeMutableBytes(of: &destination) { bytes in
            if guestBuffers {
                _ = IOVec.copyOut(UnsafeBufferPointer(windowIOVecs(chains: cacheCount)), from: headerSize, into: bytes)
            } else {
                bytes.copyMemory(from: UnsafeRawBufferPointer(rebasing: bounce[headerSize..<headerSize + 6]))
            }
        }
        let address = MACAddress(destination.0, destination.1, destination.2, destination.3, destination.4, destination.5)
        return filter.accepts(destination: address, mac: mac)
    }

    /// Marks the pages of the first `length` bytes of the window's buffers (what the backend or the
    /// bounce copy wrote, num_buffers included) in the dirty log.
    @inline(never)  // off the fast path: inlined, it slows complete() even while logging is off
    private func logWrite(_ length: Int) {
        let memory = ring.memory
        logging.withLog { log in
            var remaining = length
            for vector in iovecs.buffer(window..<iovecs.count) where remaining > 0 {
                let written = min(vector.iov_len, remaining)
                if let base = vector.iov_base, let address = memory.guestAddress(host: base) {
                    log.mark(address, length: UInt64(written))
                }
                remaining -= written
            }
        }
    }

    private func logUsedRing() {
        logging.withLog { ring.markDeviceWrites(in: $0) }
    }

    private func publish() {
        ring.publishUsed()
        logUsedRing()
        if ring.needsInterrupt() {
            counters.countInterrupt()
            try? call?.signal()
        }
    }

    private func drop(head: ChainHead, _ why: Any) {
        ring.addUsed(head: head, length: 0)
        counters.countDrop(.badChain)
        faultsLogged += 1
        logger.log(level: faultsLogged <= 8 ? .warning : .debug, "receive buffer refused", metadata: [
            "queue": "\(index)", "detail": "\(why)",
        ])
    }

    func enableNotifications() throws(VirtqueueError) -> Bool {
        defer { logUsedRing() }
        return try ring.enableNotifications()
    }
    func disableNotifications() {
        ring.disableNotifications()
        logUsedRing()
    }
}
