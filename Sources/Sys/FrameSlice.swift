#if canImport(Glibc)
import Glibc
#endif

/// One frame of a burst for vectored I/O: its iovecs (for a virtio-net frame, the header first).
public struct FrameSlice: @unchecked Sendable {
    public var iovecs: UnsafePointer<iovec>
    public var count: Int
    public init(iovecs: UnsafePointer<iovec>, count: Int) {
        self.iovecs = iovecs
        self.count = count
    }
    @inlinable public var buffer: UnsafeBufferPointer<iovec> { UnsafeBufferPointer(start: iovecs, count: count) }
}
