#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Logging
import Sys
import Virtqueue

/// How a pass over a queue ended.
public enum QueuePassResult: Equatable, Sendable {
    /// Nothing more to do until the next kick (or, for receive, the next frame).
    case idle
    /// The budget ran out with work left: call again after serving the other queues.
    case budgetExhausted
    /// Transmit: the backend would block; wait for it to become writable. Receive: no guest buffers;
    /// wait for a kick.
    case blocked
    /// The guest broke the ring; the device needs a reset.
    case broken(QueueFault)
}

/// Limits shared by the engines.
enum EngineLimits {
    /// Frames between used-ring publications (and so at most one interrupt per this many frames).
    static let burst = 64
    /// writev/readv take at most UIO_MAXIOV (1024) segments.
    static let maximumSegmentsPerFrame = 1024
    /// The largest frame a TAP hands over: 64 KiB of IP, Ethernet and VLAN headers, the vnet header.
    static let largestReceiveFrame = 65535 + 14 + 4 + VirtioNetHeader.size
}

/// The guest-to-backend side of one queue pair. Owned by one thread at a time (its worker).
final class TransmitQueue<Ring: DeviceQueue>: FrameEngine, @unchecked Sendable {
    // One worker thread at a time owns an engine, so its state opts out of dynamic exclusivity
    // checks, which cost about a third of the per-frame instructions (measured with callgrind).
    @exclusivity(unchecked) private(set) var ring: Ring
    let index: Int
    let backendQueue: Int
    let call: EventFD?
    let counters: QueueCounters
    let features: VirtioNetFeatures
    /// The largest non-GSO frame (Ethernet header onwards) the MTU allows, with a VLAN tag.
    let maximumFrameLength: Int
    /// The header in front of each frame: 12 bytes, or 10 for a legacy driver without mergeable buffers.
    let headerSize: Int
    @exclusivity(unchecked) private var iovecs = IOVecArray(capacity: 4 * EngineLimits.maximumSegmentsPerFrame)
    /// The burst being built: each frame's iovecs (in `iovecs`), its head, and the backend's outcome.
    private let burstFrames = UnsafeMutablePointer<FrameSlice>.allocate(capacity: EngineLimits.burst)
    private let burstHeads = UnsafeMutablePointer<ChainHead>.allocate(capacity: EngineLimits.burst)
    private let burstLengths = UnsafeMutablePointer<Int>.allocate(capacity: EngineLimits.burst)
    private let burstOutcomes = UnsafeMutablePointer<TransmitOutcome>.allocate(capacity: EngineLimits.burst)
    private let header = UnsafeMutableRawBufferPointer.allocate(byteCount: VirtioNetHeader.size, alignment: 8)
    private let logger: Logger
    @exclusivity(unchecked) private var faultsLogged = 0
    /// Dirty logging (live migration): transmit writes only the used ring.
    private let logging: DirtyLogging

    init(index: Int, backendQueue: Int, ring: Ring, call: EventFD?, counters: QueueCounters,
         features: VirtioNetFeatures, mtu: Int, logger: Logger, logging: DirtyLogging = DirtyLogging()) {
        self.logging = logging
        self.index = index
        self.backendQueue = backendQueue
        self.ring = ring
        self.call = call
        self.counters = counters
        self.features = features
        self.maximumFrameLength = mtu + 14 + 4
        self.headerSize = VirtioNetHeader.size(for: features)
        header.initializeMemory(as: UInt8.self, repeating: 0)
        self.logger = logger
    }

    deinit {
        header.deallocate()
        burstFrames.deallocate()
        burstHeads.deallocate()
        burstLengths.deallocate()
        burstOutcomes.deallocate()
    }

    /// Where the queue stands: every chain taken was given back or put back at the end of a pass.
    var base: UInt32 { ring.base }

    /// Moves up to `budget` frames from the ring to the backend, in bursts of valid frames handed to
    /// the backend together (one io_uring submission for a TAP).
    func process<Backend: PacketBackend>(backend: Backend, budget: Int) -> QueuePassResult {
        var handled = 0
        var unpublished = 0
        var frames = 0
        var bytes = 0
        var result = QueuePassResult.budgetExhausted
        iovecs.removeAll()
        var pending = 0

        /// Hands the pending burst to the backend; false when it would block.
        func flush() -> Bool {
            guard pending > 0 else { return true }
            let attempted = backend.transmit(queue: backendQueue, frames: UnsafeBufferPointer(start: burstFrames, count: pending), outcomes: burstOutcomes)
            var blocked = false
            for index in 0..<attempted {
                switch burstOutcomes[index] {
                case .sent:
                    ring.addUsed(head: burstHeads[index], length: 0)
                    frames += 1
                    bytes += burstLengths[index]
                    unpublished += 1
                case .dropped:
                    ring.addUsed(head: burstHeads[index], length: 0)
                    counters.countDrop(.backend)
                    unpublished += 1
                case .wouldBlock:
                    blocked = true
                }
            }
            if blocked || attempted < pending {
                // The blocked frame and those after it were the last chains popped: pop them again later.
                let notSent = pending - attempted + (blocked ? 1 : 0)
                ring.undoPop(notSent)
                handled -= notSent
            }
            pending = 0
            iovecs.removeAll()
            if unpublished >= EngineLimits.burst {
                publish()
                unpublished = 0
            }
            return !blocked
        }

        while handled < budget {
            if pending == EngineLimits.burst || iovecs.capacity - iovecs.count < EngineLimits.maximumSegmentsPerFrame {
                guard flush() else { result = .blocked; break }
            }
            let chain: DescriptorChain
            do throws(VirtqueueError) {
                guard let popped = try ring.popChain(into: &iovecs) else {
                    result = .idle
                    break
                }
                chain = popped
            } catch {
                if case .badChain(let head, let fault) = error {
                    // Only the last chains popped can be put back, so the burst before a bad chain
                    // goes out first; the bad chain is popped again and answered after it.
                    if pending > 0 {
                        ring.undoPop(1)
                        guard flush() else { result = .blocked; break }
                        continue
                    }
                    drop(head: head, .badChain, fault)
                    unpublished += 1
                    handled += 1
                    continue
                }
                if case .broken(let fault) = error { result = .broken(fault) }
                break
            }
            handled += 1
            let frameLength = Int(chain.readableLength) - headerSize
            let frame = UnsafeBufferPointer(iovecs.buffer(chain.readable))
            var refusal: (DropReason, String)? = nil
            if !chain.writable.isEmpty || frameLength < 0 {
                refusal = (.badChain, chain.writable.isEmpty ? "chain shorter than the header" : "writable descriptor in a transmit chain")
            } else {
                // A legacy header is 10 bytes; the last two of the buffer stay zero.
                _ = IOVec.copyOut(frame, from: 0, into: UnsafeMutableRawBufferPointer(rebasing: header[0..<headerSize]))
                let parsed = VirtioNetHeader(bytes: UnsafeRawBufferPointer(header))
                do {
                    try parsed.validateForTransmit(frameLength: frameLength, features: features)
                    if parsed.gsoTypeRaw == 0 && frameLength > maximumFrameLength {
                        refusal = (.oversize, "frame of \(frameLength) bytes exceeds the MTU")
                    }
                } catch {
                    refusal = (.badHeader, error.description)
                }
            }
            if let (reason, why) = refusal {
                iovecs.count = chain.readable.lowerBound
                if pending > 0 {
                    ring.undoPop(1)
                    handled -= 1
                    guard flush() else { result = .blocked; break }
                    continue
                }
                drop(head: chain.head, reason, why)
                unpublished += 1
                continue
            }
            burstFrames[pending] = FrameSlice(iovecs: UnsafePointer(iovecs.base + chain.readable.lowerBound), count: chain.readable.count)
            burstHeads[pending] = chain.head
            burstLengths[pending] = frameLength
            pending += 1
        }
        if result != .blocked, !flush() { result = .blocked }
        if unpublished > 0 { publish() }
        counters.addFrames(frames, bytes: bytes)
        return result
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

    private func drop(head: ChainHead, _ reason: DropReason, _ why: Any) {
        ring.addUsed(head: head, length: 0)
        counters.countDrop(reason)
        logFault(reason, why)
    }

    private func logFault(_ reason: DropReason, _ why: Any) {
        // The guest controls how often this happens: a few warnings, then debug only.
        faultsLogged += 1
        let level: Logger.Level = faultsLogged <= 8 ? .warning : .debug
        logger.log(level: level, "transmit frame dropped", metadata: [
            "queue": "\(index)", "reason": "\(reason)", "detail": "\(why)",
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
