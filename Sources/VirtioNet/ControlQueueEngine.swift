import GuestMemory
import Logging
import Sys
import Virtqueue

/// Serves the control virtqueue: each chain is class, command, data (readable) and an ack byte (writable).
final class ControlQueueEngine<Ring: DeviceQueue>: ControlEngine, @unchecked Sendable {
    private(set) var ring: Ring
    let index: Int
    let call: EventFD?
    let counters: QueueCounters
    private var iovecs = IOVecArray(capacity: 256)
    private let logger: Logger
    private var faultsLogged = 0
    /// Dirty logging (live migration): the ack byte and the used ring.
    private let logging: DirtyLogging
    /// Commands carry at most two MAC tables; anything this long is hostile.
    static var maximumCommandLength: Int { 64 * 1024 }

    /// Executes one command (class, command, data) and returns the ack byte.
    let execute: @Sendable ([UInt8]) -> ControlAck

    init(index: Int, ring: Ring, call: EventFD?, counters: QueueCounters, logger: Logger, logging: DirtyLogging = DirtyLogging(),
         execute: @escaping @Sendable ([UInt8]) -> ControlAck) {
        self.execute = execute
        self.logging = logging
        self.index = index
        self.ring = ring
        self.call = call
        self.counters = counters
        self.logger = logger
    }

    var base: UInt32 { ring.base }

    /// Answers up to `budget` pending commands (refused ones count too, so a pass always ends).
    func process(budget: Int) -> QueuePassResult {
        var unpublished = 0
        var result = QueuePassResult.budgetExhausted
        var handled = 0
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
                handled += 1
                if case .badChain(let head, let fault) = error {
                    refuse(head: head, "\(fault)")
                    unpublished += 1
                    continue
                }
                if case .broken(let fault) = error { result = .broken(fault) }
                break
            }
            handled += 1
            guard chain.writableLength >= 1, chain.readableLength >= 2,
                  Int(chain.readableLength) <= Self.maximumCommandLength
            else {
                refuse(head: chain.head, "control command without an ack byte or of a bad length")
                unpublished += 1
                continue
            }
            var command = [UInt8](repeating: 0, count: Int(chain.readableLength))
            _ = command.withUnsafeMutableBytes { IOVec.copyOut(UnsafeBufferPointer(iovecs.buffer(chain.readable)), from: 0, into: $0) }
            var ack = execute(command).rawValue
            _ = withUnsafeBytes(of: &ack) { IOVec.copyIn($0, to: UnsafeBufferPointer(iovecs.buffer(chain.writable)), at: 0) }
            if logging.isEnabled, let base = iovecs.buffer(chain.writable).first?.iov_base,
               let address = ring.memory.guestAddress(host: base) {
                logging.mark(address, length: 1)
            }
            ring.addUsed(head: chain.head, length: 1)
            counters.addFrames(1, bytes: command.count)
            unpublished += 1
        }
        if unpublished > 0 {
            ring.publishUsed()
            logUsedRing()
            if ring.needsInterrupt() {
                counters.countInterrupt()
                try? call?.signal()
            }
        }
        return result
    }

    private func logUsedRing() {
        logging.withLog { ring.markDeviceWrites(in: $0) }
    }

    func enableNotifications() throws(VirtqueueError) -> Bool {
        defer { logUsedRing() }
        return try ring.enableNotifications()
    }
    func disableNotifications() {
        ring.disableNotifications()
        logUsedRing()
    }

    private func refuse(head: ChainHead, _ why: String) {
        ring.addUsed(head: head, length: 0)
        counters.countDrop(.badChain)
        // The guest controls how often this happens: a few warnings, then debug only.
        faultsLogged += 1
        logger.log(level: faultsLogged <= 8 ? .warning : .debug, "control command refused", metadata: [
            "queue": "\(index)", "detail": "\(why)",
        ])
    }
}
