#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import VirtioNet

/// A loopback backend that notes the name of each thread that transmits, to check that only a
/// queue's owner touches it.
public final class SenderRecordingBackend: PacketBackend {
    public let inner: LoopbackBackend
    private let names = Mutex<[String]>([])

    public init(queuePairs: Int = 1) throws { inner = try LoopbackBackend(queuePairs: queuePairs) }

    /// The names of the threads that transmitted, in order.
    public var senders: [String] { names.withLock { $0 } }

    public var queuePairs: Int { inner.queuePairs }
    public var receiveOffloads: OffloadSet { inner.receiveOffloads }
    public var transmitOffloads: OffloadSet { inner.transmitOffloads }
    public func setReceiveOffloads(_ offloads: OffloadSet) throws(BackendError) { try inner.setReceiveOffloads(offloads) }
    public func setActiveQueuePairs(_ count: Int) throws(BackendError) { try inner.setActiveQueuePairs(count) }

    public func transmit(queue: Int, frame: UnsafeBufferPointer<iovec>) -> TransmitOutcome {
        var name = [UInt8](repeating: 0, count: 32)
        let fd = open("/proc/thread-self/comm", O_RDONLY | O_CLOEXEC)
        let count = fd < 0 ? 0 : max(0, read(fd, &name, name.count))
        if fd >= 0 { close(fd) }
        let thread = String(decoding: name.prefix(count).prefix { $0 != 10 }, as: UTF8.self)
        names.withLock { $0.append(thread) }
        return inner.transmit(queue: queue, frame: frame)
    }

    public func receive(queue: Int, into buffers: UnsafeBufferPointer<iovec>) -> ReceiveOutcome {
        inner.receive(queue: queue, into: buffers)
    }

    public func descriptor(queue: Int) -> Int32 { inner.descriptor(queue: queue) }
}
