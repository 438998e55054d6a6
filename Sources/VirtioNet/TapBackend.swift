#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Synchronization
import Tap

/// The production backend: a TAP interface with one queue per queue pair. Guest buffers go to and
/// come from the kernel as they are (the virtio_net_hdr_v1 is the TAP's vnet header).
public final class TapBackend: PacketBackend {
    public let tap: TapDevice
    public let receiveOffloads: OffloadSet
    public let transmitOffloads: OffloadSet
    public var queuePairs: Int { tap.queueCount }
    /// One io_uring per queue, made by the queue's worker on first use; nil if io_uring is unavailable
    /// (or disabled with VIRTIO_NET_IO_URING=0), in which case bursts go out with one writev each.
    private let urings: [UringSlot]
    fileprivate static let uringAllowed = getenv("VIRTIO_NET_IO_URING").map { String(cString: $0) != "0" } ?? true

    /// Wraps an open TAP and probes which offloads its kernel supports.
    public init(tap: TapDevice) {
        self.tap = tap
        let probed = tap.probeOffloads()
        var receive: OffloadSet = []
        if probed.contains(.csum) { receive.insert(.csum) }
        if probed.contains(.tso4) { receive.insert(.tso4) }
        if probed.contains(.tso6) { receive.insert(.tso6) }
        if probed.contains(.tsoECN) { receive.insert(.ecn) }
        if probed.contains(.ufo) { receive.insert(.ufo) }
        if probed.isSuperset(of: [.uso4, .uso6]) { receive.insert(.uso) }
        receiveOffloads = receive
        // The kernel takes GSO and partial checksums in written vnet headers whatever TUNSETOFFLOAD
        // says; UDP_L4 (USO) only on kernels that also know TUN_F_USO4/6.
        var transmit: OffloadSet = [.csum, .tso4, .tso6, .ecn, .ufo]
        if receive.contains(.uso) { transmit.insert(.uso) }
        transmitOffloads = transmit
        urings = (0..<tap.queueCount).map { _ in UringSlot() }
    }

    /// Opens (creating or attaching) the TAP `name` with `queuePairs` queues.
    public convenience init(name: String, queuePairs: Int = 1) throws(TapError) {
        self.init(tap: try TapDevice.open(name: name, queuePairs: queuePairs))
    }

    /// Descriptors held now: the TAP's, and an io_uring for each queue whose worker made one.
    public var descriptorCount: Int { tap.descriptorCount + urings.filter(\.isCreated).count }

    public func setReceiveOffloads(_ offloads: OffloadSet) throws(BackendError) {
        var flags: TapOffloads = []
        if offloads.contains(.csum) {
            flags.insert(.csum)
            if offloads.contains(.tso4) { flags.insert(.tso4) }
            if offloads.contains(.tso6) { flags.insert(.tso6) }
            if offloads.contains(.ecn) && !flags.isDisjoint(with: [.tso4, .tso6]) { flags.insert(.tsoECN) }
            if offloads.contains(.ufo) { flags.insert(.ufo) }
            if offloads.contains(.uso) { flags.formUnion([.uso4, .uso6]) }
        }
        do { try tap.setOffloads(flags) } catch { throw BackendError(error.description) }
    }

    public func setMTU(_ mtu: Int) throws(BackendError) {
        do { try tap.setMTU(mtu) } catch { throw BackendError(error.description) }
    }

    public func setActiveQueuePairs(_ count: Int) throws(BackendError) {
        guard tap.isMultiQueue else { return }
        do {
            // Attach first, then detach, so at least one queue stays attached throughout.
            for queue in 0..<min(count, tap.queueCount) where !tap.isQueueEnabled(queue) {
                try tap.setQueueEnabled(queue, true)
            }
            for queue in count..<tap.queueCount where tap.isQueueEnabled(queue) {
                try tap.setQueueEnabled(queue, false)
            }
        } catch {
            throw BackendError(error.description)
        }
    }

    @inlinable
    public func transmit(queue: Int, frame: UnsafeBufferPointer<iovec>) -> TransmitOutcome {
        do {
            return try tap.write(queue: queue, iovecs: frame) == nil ? .wouldBlock : .sent
        } catch {
            return .dropped(errno: Self.errno(of: error))
        }
    }

    @inlinable
    public func receive(queue: Int, into buffers: UnsafeBufferPointer<iovec>) -> ReceiveOutcome {
        do {
            guard let count = try tap.read(queue: queue, into: buffers) else { return .empty }
            return .received(bytes: count)
        } catch {
            return .dropped(errno: Self.errno(of: error))
        }
    }

    public func descriptor(queue: Int) -> Int32 { tap.fd(queue: queue) }

    /// A burst goes to the kernel as one io_uring submission of writevs (one system call instead of
    /// one per frame). TAP writes do not block, so an EAGAIN here is counted as a drop.
    public func transmit(queue: Int, frames: UnsafeBufferPointer<FrameSlice>, outcomes: UnsafeMutablePointer<TransmitOutcome>) -> Int {
        let fd = tap.fd(queue: queue)
        guard frames.count > 1, let ring = urings[queue].ring(entries: 256, file: fd) else {
            return transmitEach(queue: queue, frames: frames, outcomes: outcomes)
        }
        // The guest wrote these frames on another core: asking for all their first lines now lets
        // the misses overlap, instead of the kernel's copy waiting on each frame in turn.
        for frame in frames {
            cvs_prefetch_iovecs(frame.iovecs, UInt32(truncatingIfNeeded: frame.count), 256)
        }
        for (index, frame) in frames.enumerated() {
            _ = cvs_uring_prep_writev(ring, fd, frame.iovecs, UInt32(truncatingIfNeeded: frame.count), UInt64(index))
        }
        var completed = 0
        var wait = UInt32(frames.count)
        while completed < frames.count {
            if cvs_uring_submit_and_wait(ring, wait) < 0 {
                // The ring failed as a whole (not a frame): the frames not completed are dropped.
                let code = Glibc.errno
                for index in 0..<frames.count where !urings[queue].isDone(index) { outcomes[index] = .dropped(errno: code) }
                urings[queue].resetDone()
                return frames.count
            }
            var userData: UInt64 = 0
            var result: Int32 = 0
            while cvs_uring_next_completion(ring, &userData, &result) == 1 {
                let index = Int(truncatingIfNeeded: userData)
                guard index >= 0, index < frames.count else { continue }
                outcomes[index] = result >= 0 ? .sent : .dropped(errno: -result)
                urings[queue].markDone(index)
                completed += 1
            }
            wait = UInt32(frames.count - completed)
        }
        urings[queue].resetDone()
        return frames.count
    }

    @usableFromInline
    static func errno(of error: TapError) -> Int32 {
        if case .system(_, let system) = error { return system.errno.rawValue }
        return EIO
    }
}

/// A lazily created io_uring, used by one worker at a time.
final class UringSlot: @unchecked Sendable {
    private var pointer: OpaquePointer?
    private var unavailable = false
    /// Set once the ring exists; read by other threads for descriptor accounting.
    private let created = Atomic<Bool>(false)
    var isCreated: Bool { created.load(ordering: .relaxed) }
    /// Which frames of the current burst have completed (at most 64 per burst).
    private var done: UInt64 = 0

    /// The ring, created on first use with `file` (the queue's TAP fd) registered as its fixed file.
    func ring(entries: UInt32, file: Int32) -> OpaquePointer? {
        if let pointer { return pointer }
        guard !unavailable, TapBackend.uringEnabled else { return nil }
        pointer = cvs_uring_create(entries)
        unavailable = pointer == nil
        // Without the registration requests still work, through the ordinary file lookup.
        if let pointer {
            _ = cvs_uring_register_file(pointer, file)
            created.store(true, ordering: .relaxed)
        }
        return pointer
    }

    func markDone(_ index: Int) { if index < 64 { done |= 1 << UInt64(index) } }
    func isDone(_ index: Int) -> Bool { index < 64 && done & (1 << UInt64(index)) != 0 }
    func resetDone() { done = 0 }

    deinit {
        if let pointer { cvs_uring_destroy(pointer) }
    }
}

extension TapBackend {
    static var uringEnabled: Bool { uringAllowed }
}
