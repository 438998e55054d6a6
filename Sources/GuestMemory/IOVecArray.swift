#if canImport(Glibc)
import Glibc
#endif

/// A fixed-capacity array of iovecs allocated once and reused, so the data path never allocates.
public struct IOVecArray: ~Copyable {
    public let base: UnsafeMutablePointer<iovec>
    public let capacity: Int
    public var count: Int = 0

    public init(capacity: Int) {
        precondition(capacity > 0, "IOVecArray capacity must be positive")  // a programming error, not input
        base = .allocate(capacity: capacity)
        self.capacity = capacity
    }

    deinit { base.deallocate() }

    @inlinable public var isFull: Bool { count == capacity }

    /// Appends one segment; false when full.
    @inlinable
    public mutating func append(base pointer: UnsafeMutableRawPointer, length: Int) -> Bool {
        guard count < capacity else { return false }
        base[count] = iovec(iov_base: pointer, iov_len: length)
        count += 1
        return true
    }

    @inlinable public mutating func removeAll() { count = 0 }

    /// The iovecs in `range` as a buffer, valid until the array changes.
    @inlinable
    public func buffer(_ range: Range<Int>) -> UnsafeMutableBufferPointer<iovec> {
        UnsafeMutableBufferPointer(start: base + range.lowerBound, count: range.count)
    }

    @inlinable public var all: UnsafeMutableBufferPointer<iovec> { buffer(0..<count) }

    public func copyOut(from offset: Int, into destination: UnsafeMutableRawBufferPointer) -> Int {
        IOVec.copyOut(UnsafeBufferPointer(all), from: offset, into: destination)
    }

    public func copyIn(_ source: UnsafeRawBufferPointer, at offset: Int) -> Int {
        IOVec.copyIn(source, to: UnsafeBufferPointer(all), at: offset)
    }
}

/// Byte copies across scattered segments (headers that straddle descriptors, control messages).
public enum IOVec {
    /// Total bytes described by `iovecs`.
    @inlinable
    public static func totalLength(_ iovecs: UnsafeBufferPointer<iovec>) -> Int {
        var total = 0
        for vector in iovecs { total += vector.iov_len }
        return total
    }

    /// Copies up to `destination.count` bytes starting `offset` bytes into the segments; returns the count.
    @inlinable
    public static func copyOut(_ iovecs: UnsafeBufferPointer<iovec>, from offset: Int, into destination: UnsafeMutableRawBufferPointer) -> Int {
        var skip = offset
        var copied = 0
        for vector in iovecs {
            if copied == destination.count { break }
            guard let segmentBase = vector.iov_base else { continue }
            if skip >= vector.iov_len { skip -= vector.iov_len; continue }
            let length = min(vector.iov_len - skip, destination.count - copied)
            (destination.baseAddress! + copied).copyMemory(from: segmentBase + skip, byteCount: length)
            copied += length
            skip = 0
        }
        return copied
    }

    /// Copies `source` into the segments starting `offset` bytes in; returns how many bytes fit.
    @inlinable
    public static func copyIn(_ source: UnsafeRawBufferPointer, to iovecs: UnsafeBufferPointer<iovec>, at offset: Int) -> Int {
        var skip = offset
        var copied = 0
        for vector in iovecs {
            if copied == source.count { break }
            guard let segmentBase = vector.iov_base else { continue }
            if skip >= vector.iov_len { skip -= vector.iov_len; continue }
            let length = min(vector.iov_len - skip, source.count - copied)
            (segmentBase + skip).copyMemory(from: source.baseAddress! + copied, byteCount: length)
            copied += length
            skip = 0
        }
        return copied
    }
}
