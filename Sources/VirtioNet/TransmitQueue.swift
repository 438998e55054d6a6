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
final class TransmitQueue: @unchecked Sendable {
    // One worker thread at a time owns an engine, so its state opts out of dynamic exclusivity
    // checks, which cost about a third of the per-frame instructions (measured with callgrind).
    @exclusivity(unchecked) private(set) var ring: SplitQueue
    let index: Int
    let backendQueue: Int
    let call: EventFD?
    let counters: QueueCounters
    let features: VirtioNetFeatures
    /// The largest non-GSO frame (Ethernet header onwards) the MTU allows, with a VLAN tag.
    let maximumFrameLength: Int
    @exclusivity(unchecked) private var iovecs = IOVecArray(capacity: EngineLimits.maximumSegmentsPerFrame)
    private let header = UnsafeMutableRawBufferPointer.allocate(byteCount: VirtioNetHeader.size, alignment: 8)
    private let logger: Logger
    @exclusivity(unchecked) private var faultsLogged = 0

    init(index: Int, backendQueue: Int, ring: SplitQueue, call: EventFD?, counters: QueueCounters,
         features: VirtioNetFeatures, mtu: Int, logger: Logger) {
        self.index = index
        self.backendQueue = backendQueue
        self.ring = ring
        self.call = call
        self.counters = counters
        self.features = features
        self.maximumFrameLength = mtu + 14 + 4
        self.logger = logger
    }

    deinit { header.deallocate() }

    var nextAvailableIndex: UInt16 { ring.nextAvailableIndex }

    /// Moves up to `budget` frames from the ring to the backend.
    func process<Backend: PacketBackend>(backend: Backend, budget: Int) -> QueuePassResult {
        var handled = 0
        var unpublished = 0
        var frames = 0
        var bytes = 0
        var result = QueuePassResult.budgetExhausted
        while handled < budget {
            iovecs.removeAll()
            let chain: DescriptorChain
            do throws(VirtqueueError) {
                guard let popped = try ring.popChain(into: &iovecs) else {
                    result = .idle
                    break
                }
                chain = popped
            } catch {
                if case .badChain(let head, let fault) = error {
                    drop(head: head, .badChain, fault)
                    unpublished += 1
                    handled += 1
                    continue
                }
                if case .broken(let fault) = error { result = .broken(fault) }
                break
            }
            handled += 1
            let frameLength = Int(chain.readableLength) - VirtioNetHeader.size
            guard chain.writable.isEmpty, frameLength >= 0 else {
                drop(head: chain.head, .badChain, chain.writable.isEmpty ? "chain shorter than the header" : "writable descriptor in a transmit chain")
                unpublished += 1
                continue
            }
            let frame = UnsafeBufferPointer(iovecs.buffer(chain.readable))
            _ = IOVec.copyOut(frame, from: 0, into: header)
            let parsed = VirtioNetHeader(bytes: UnsafeRawBufferPointer(header))
            do {
                try parsed.validateForTransmit(frameLength: frameLength, features: features)
            } catch {
                drop(head: chain.head, .badHeader, error)
                unpublished += 1
                continue
            }
            if parsed.gsoTypeRaw == 0 && frameLength > maximumFrameLength {
                drop(head: chain.head, .oversize, "frame of \(frameLength) bytes exceeds the MTU")
                unpublished += 1
                continue
            }
            switch backend.transmit(queue: backendQueue, frame: frame) {
            case .sent:
                ring.addUsed(head: chain.head, length: 0)
                frames += 1
                bytes += frameLength
            case .wouldBlock:
                // Keep the chain: it is popped again once the backend is writable.
                ring.undoPop(1)
                handled -= 1
                result = .blocked
            case .dropped:
                ring.addUsed(head: chain.head, length: 0)
                counters.countDrop(.backend)
            }
            if result == .blocked { break }
            unpublished += 1
            if unpublished >= EngineLimits.burst {
                publish()
                unpublished = 0
            }
        }
        if unpublished > 0 { publish() }
        counters.addFrames(frames, bytes: bytes)
        return result
    }

    private func publish() {
        ring.publishUsed()
        if ring.needsInterrupt() {
            counters.countInterrupt()
            try? call?.signal()
        }
    }

    private func drop(head: UInt16, _ reason: DropReason, _ why: Any) {
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

    func enableNotifications() throws(VirtqueueError) -> Bool { try ring.enableNotifications() }
    func disableNotifications() { ring.disableNotifications() }
}
