#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Synchronization
import Sys

/// Writes bursts of frames to one descriptor (a TAP queue): as one io_uring submission of writes
/// where io_uring is available, else one writev per frame. Used by one thread at a time (the queue's
/// worker), which also creates the ring on first use.
///
/// Set VIRTIO_NET_IO_URING=0 in the environment to use writev only.
public final class BurstWriter: @unchecked Sendable {
    private let fd: Int32
    private var ring: OpaquePointer?
    private var ringUnavailable: Bool
    /// Which frames of the current burst have completed (at most `maximumBurst`).
    private var done: UInt64 = 0
    private let ringCreated = Atomic<Bool>(false)

    /// Whether the writer holds an io_uring (a descriptor), for accounting from any thread.
    public var hasRing: Bool { ringCreated.load(ordering: .relaxed) }

    /// The most frames one call takes.
    public static let maximumBurst = 64
    /// False when VIRTIO_NET_IO_URING=0 is in the environment.
    public static let uringAllowed = getenv("VIRTIO_NET_IO_URING").map { String(cString: $0) != "0" } ?? true

    /// Writes to `fd`, which the caller keeps open for as long as the writer lives.
    public init(fd: Int32, useURing: Bool = BurstWriter.uringAllowed) {
        self.fd = fd
        self.ringUnavailable = !useURing
    }

    deinit {
        if let ring { cvs_uring_destroy(ring) }
    }

    /// Writes `frames` (at most `maximumBurst`) in order and reports each attempted frame's outcome
    /// with `report(index, result)`: the bytes written, or -errno. It stops at the first frame that
    /// fails: the frames after it are neither written nor reported. Returns how many were attempted.
    ///
    /// One contract for both ways of writing: a frame the descriptor cannot take now is -EAGAIN
    /// (wait until it is writable, then write it and those after it again).
    public func write(_ frames: UnsafeBufferPointer<FrameSlice>, report: (_ index: Int, _ result: Int) -> Void) -> Int {
        let count = min(frames.count, Self.maximumBurst)
        guard count > 1, let ring = uring() else { return writeEach(UnsafeBufferPointer(rebasing: frames[0..<count]), report: report) }
        // The guest wrote these frames on another core: asking for all their first lines now lets
        // the misses overlap, instead of the kernel's copy waiting on each frame in turn.
        for frame in frames.prefix(count) {
            cvs_prefetch_iovecs(frame.iovecs, UInt32(truncatingIfNeeded: frame.count), 256)
        }
        // Linked: in order, and a failure cancels the rest (reported -ECANCELED, not attempted).
        for (index, frame) in frames.prefix(count).enumerated() {
            _ = cvs_uring_prep_writev(ring, fd, frame.iovecs, UInt32(truncatingIfNeeded: frame.count), UInt64(index), index < count - 1 ? 1 : 0)
        }
        var completed = 0
        var attempted = count
        var wait = UInt32(count)
        while completed < count {
            if cvs_uring_submit_and_wait(ring, wait) < 0 {
                // The ring failed as a whole (not a frame): the frames not completed failed with it.
                let code = Glibc.errno
                for index in 0..<count where !isDone(index) { report(index, -Int(code)) }
                done = 0
                return count
            }
            var userData: UInt64 = 0
            var result: Int32 = 0
            while cvs_uring_next_completion(ring, &userData, &result) == 1 {
                let index = Int(truncatingIfNeeded: userData)
                guard index >= 0, index < count else { continue }
                done |= 1 << UInt64(index)
                completed += 1
                if result == -ECANCELED {
                    attempted = min(attempted, index)
                } else {
                    report(index, Int(result))
                    if result < 0 { attempted = min(attempted, index + 1) }
                }
            }
            wait = UInt32(count - completed)
        }
        done = 0
        return attempted
    }

    /// One writev per frame, stopping after the first that fails.
    private func writeEach(_ frames: UnsafeBufferPointer<FrameSlice>, report: (Int, Int) -> Void) -> Int {
        for (index, frame) in frames.enumerated() {
            let written: Int?
            do {
                written = try retryingOnInterruptUnlessWouldBlock("writev") {
                    Glibc.writev(fd, frame.iovecs, Int32(truncatingIfNeeded: frame.count))
                }
            } catch {
                report(index, -Int(error.errno.rawValue))
                return index + 1
            }
            guard let written else {
                report(index, -Int(EAGAIN))
                return index + 1
            }
            report(index, written)
        }
        return frames.count
    }

    private func isDone(_ index: Int) -> Bool { done & (1 << UInt64(index)) != 0 }

    /// The ring, created on first use with the descriptor registered as its fixed file; nil if
    /// io_uring is unavailable (or disabled).
    private func uring() -> OpaquePointer? {
        if let ring { return ring }
        guard !ringUnavailable else { return nil }
        ring = cvs_uring_create(256)
        ringUnavailable = ring == nil
        // Without the registration requests still work, through the ordinary file lookup.
        if let ring {
            _ = cvs_uring_register_file(ring, fd)
            ringCreated.store(true, ordering: .relaxed)
        }
        return ring
    }
}
