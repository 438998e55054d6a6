#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Synchronization
import Sys

/// An in-memory backend: every frame transmitted on queue pair N comes back on queue pair N's receive
/// side. For tests and benchmarks of the device without a kernel in the way. It copies (a TAP does not).
public final class LoopbackBackend: PacketBackend {
    public let queuePairs: Int
    public let receiveOffloads: OffloadSet
    public let transmitOffloads: OffloadSet
    /// Frames held per queue before transmit reports `wouldBlock`.
    public let capacity: Int

    private struct Queue {
        var frames: [[UInt8]] = []
        var head = 0
        var count: Int { frames.count - head }
        mutating func popFirst() -> [UInt8]? {
            guard head < frames.count else { return nil }
            let frame = frames[head]
            head += 1
            if head == frames.count { frames.removeAll(keepingCapacity: true); head = 0 }
            return frame
        }
    }

    private final class LockedQueue: Sendable {
        let mutex = Mutex(Queue())
        func withLock<R>(_ body: (inout Queue) -> R) -> R { mutex.withLock { body(&$0) } }
    }

    private let queues: [LockedQueue]
    private let readiness: [EventFD]
    private let state = Mutex<(offloads: OffloadSet, activePairs: Int, tooLarge: Int)>(([], 1, 0))

    public init(queuePairs: Int = 1, offloads: OffloadSet = .all, capacity: Int = 4096) throws(SystemError) {
        self.queuePairs = queuePairs
        self.receiveOffloads = offloads
        self.transmitOffloads = offloads
        self.capacity = capacity
        self.queues = (0..<queuePairs).map { _ in LockedQueue() }
        var events: [EventFD] = []
        for _ in 0..<queuePairs { events.append(try EventFD()) }
        self.readiness = events
    }

    public var enabledReceiveOffloads: OffloadSet { state.withLock { $0.offloads } }
    public var activeQueuePairs: Int { state.withLock { $0.activePairs } }
    /// Frames dropped because the guest's buffers could not hold them.
    public var tooLargeDrops: Int { state.withLock { $0.tooLarge } }

    public func setReceiveOffloads(_ offloads: OffloadSet) throws(BackendError) {
        state.withLock { $0.offloads = offloads }
    }

    public func setActiveQueuePairs(_ count: Int) throws(BackendError) {
        guard (1...queuePairs).contains(count) else { throw BackendError("loopback: \(count) queue pairs requested, \(queuePairs) exist") }
        state.withLock { $0.activePairs = count }
    }

    public func transmit(queue: Int, frame: UnsafeBufferPointer<iovec>) -> TransmitOutcome {
        let length = IOVec.totalLength(frame)
        var bytes = [UInt8](repeating: 0, count: length)
        _ = bytes.withUnsafeMutableBytes { IOVec.copyOut(frame, from: 0, into: $0) }
        return enqueue(queue: queue, frame: bytes) ? .sent : .wouldBlock
    }

    public func receive(queue: Int, into buffers: UnsafeBufferPointer<iovec>) -> ReceiveOutcome {
        queues[queue].withLock { state -> ReceiveOutcome in
            guard let frame = state.popFirst() else { return .empty }
            if state.count == 0 { _ = try? readiness[queue].drain() }
            guard frame.count <= IOVec.totalLength(buffers) else {
                self.state.withLock { $0.tooLarge += 1 }
                return .dropped(errno: EMSGSIZE)
            }
            let copied = frame.withUnsafeBytes { IOVec.copyIn($0, to: buffers, at: 0) }
            return .received(bytes: copied)
        }
    }

    public func descriptor(queue: Int) -> Int32 { readiness[queue].rawValue }

    /// Queues a frame (header included) for the guest to receive on `queue`. False when full.
    @discardableResult
    public func inject(queue: Int, frame: [UInt8]) -> Bool { enqueue(queue: queue, frame: frame) }

    /// Takes every frame waiting on `queue` (what the guest transmitted and nobody received yet).
    public func drain(queue: Int) -> [[UInt8]] {
        queues[queue].withLock { state in
            var frames: [[UInt8]] = []
            while let frame = state.popFirst() { frames.append(frame) }
            _ = try? readiness[queue].drain()
            return frames
        }
    }

    public func pendingFrames(queue: Int) -> Int { queues[queue].withLock { $0.count } }

    private func enqueue(queue: Int, frame: [UInt8]) -> Bool {
        queues[queue].withLock { state in
            guard state.count < capacity else { return false }
            state.frames.append(frame)
            try? readiness[queue].signal()
            return true
        }
    }
}
