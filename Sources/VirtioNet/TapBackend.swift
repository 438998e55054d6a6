#if canImport(Glibc)
import Glibc
#endif
import Sys
import Tap

/// The production backend: a TAP interface with one queue per queue pair. Guest buffers go to and
/// come from the kernel as they are (the virtio_net_hdr_v1 is the TAP's vnet header).
public final class TapBackend: PacketBackend {
    public let tap: TapDevice
    public let receiveOffloads: OffloadSet
    public let transmitOffloads: OffloadSet
    public var queuePairs: Int { tap.queueCount }

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
    }

    /// Opens (creating or attaching) the TAP `name` with `queuePairs` queues.
    public convenience init(name: String, queuePairs: Int = 1) throws(TapError) {
        self.init(tap: try TapDevice.open(name: name, queuePairs: queuePairs))
    }

    /// Descriptors held now: the TAP's, and an io_uring for each queue whose worker made one.
    public var descriptorCount: Int { tap.descriptorCount }

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

    public func setHeaderSize(_ size: Int) throws(BackendError) {
        guard let value = Int32(exactly: size) else { throw BackendError("vnet header size \(size)") }
        do { try tap.setVnetHeaderSize(value) } catch { throw BackendError(error.description) }
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

    /// A burst goes to the TAP in order, in as few system calls as the kernel allows (one io_uring
    /// submission), and stops at the first frame that fails: one the TAP cannot take now is
    /// `wouldBlock`, one the kernel refuses is `dropped`; the frames after it are not attempted.
    public func transmit(queue: Int, frames: UnsafeBufferPointer<FrameSlice>, outcomes: UnsafeMutablePointer<TransmitOutcome>) -> Int {
        tap.write(queue: queue, frames: frames) { index, result in
            if result >= 0 {
                outcomes[index] = .sent
            } else if result == -Int(EAGAIN) {
                outcomes[index] = .wouldBlock
            } else {
                outcomes[index] = .dropped(errno: Int32(truncatingIfNeeded: -result))
            }
        }
    }

    @usableFromInline
    static func errno(of error: TapError) -> Int32 {
        if case .system(_, let system) = error { return system.errno.rawValue }
        return EIO
    }
}
