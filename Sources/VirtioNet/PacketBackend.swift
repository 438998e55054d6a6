#if canImport(Glibc)
import Glibc
#endif
import Sys

/// What happened to one frame handed to a backend.
public enum TransmitOutcome: Sendable, Equatable {
    case sent
    /// The backend cannot take it now; try again when `descriptor(queue:)` is writable.
    case wouldBlock
    /// The backend refused the frame (e.g. the kernel found its header invalid): drop and count it.
    case dropped(errno: Int32)
}

/// What one receive attempt produced.
public enum ReceiveOutcome: Sendable, Equatable {
    /// `bytes` bytes (vnet header included) were written into the buffers.
    case received(bytes: Int)
    /// Nothing to receive now; wait until `descriptor(queue:)` is readable.
    case empty
    /// A frame was lost (too large for the buffers, or an I/O error); the buffers are untouched.
    case dropped(errno: Int32)
}

/// An error from configuring a backend.
public struct BackendError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Where the device's frames go and come from: a TAP in production, an in-memory loopback in tests.
///
/// Frames on both sides carry the 12-byte virtio_net_hdr_v1 in front. Per-queue calls are made only by
/// the one worker that owns that queue pair; configuration calls may come from another thread.
public protocol PacketBackend: AnyObject, Sendable {
    /// How many queue pairs the backend serves.
    var queuePairs: Int { get }
    /// Offloads the backend can deliver to the guest on receive (GUEST_* features).
    var receiveOffloads: OffloadSet { get }
    /// Offloads the backend honours in transmitted headers (CSUM, HOST_* features).
    var transmitOffloads: OffloadSet { get }
    /// Enables exactly these receive offloads (the guest accepts them).
    func setReceiveOffloads(_ offloads: OffloadSet) throws(BackendError)
    /// Only the first `count` queue pairs receive traffic.
    func setActiveQueuePairs(_ count: Int) throws(BackendError)
    /// The link MTU changed (a TAP takes it as its interface MTU); the default does nothing.
    func setMTU(_ mtu: Int) throws(BackendError)
    /// Frames carry a header of `size` bytes from now on: 12, or 10 for a legacy driver without
    /// mergeable buffers (a TAP takes it as its vnet header size); the default does nothing.
    func setHeaderSize(_ size: Int) throws(BackendError)

    /// Sends one frame described by `frame` (header included).
    func transmit(queue: Int, frame: UnsafeBufferPointer<iovec>) -> TransmitOutcome
    /// Sends a burst of frames in order, as few system calls as the backend can; fills one outcome per
    /// frame attempted and returns how many were attempted. It stops after the first `wouldBlock` (and
    /// may stop after a `dropped` one), so the frames after it are untouched and go again with the
    /// next burst (the default does this with `transmit(queue:frame:)`).
    func transmit(queue: Int, frames: UnsafeBufferPointer<FrameSlice>, outcomes: UnsafeMutablePointer<TransmitOutcome>) -> Int
    /// Receives one frame into `buffers` (header first).
    func receive(queue: Int, into buffers: UnsafeBufferPointer<iovec>) -> ReceiveOutcome
    /// A descriptor that is readable while `queue` has frames, writable while it accepts them.
    func descriptor(queue: Int) -> Int32
}

extension PacketBackend {
    public func setMTU(_ mtu: Int) throws(BackendError) {}
    public func setHeaderSize(_ size: Int) throws(BackendError) {}

    public func transmit(queue: Int, frames: UnsafeBufferPointer<FrameSlice>, outcomes: UnsafeMutablePointer<TransmitOutcome>) -> Int {
        transmitEach(queue: queue, frames: frames, outcomes: outcomes)
    }

    /// A burst as single transmits, stopping after the first `wouldBlock`.
    public func transmitEach(queue: Int, frames: UnsafeBufferPointer<FrameSlice>, outcomes: UnsafeMutablePointer<TransmitOutcome>) -> Int {
        for (index, frame) in frames.enumerated() {
            let outcome = transmit(queue: queue, frame: frame.buffer)
            outcomes[index] = outcome
            if outcome == .wouldBlock { return index + 1 }
        }
        return frames.count
    }
}
