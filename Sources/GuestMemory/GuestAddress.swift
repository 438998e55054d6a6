/// A guest-physical address. A distinct type so that guest, host and frontend-user addresses never mix.
public struct GuestAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64

    @inlinable public init(rawValue: UInt64) { self.rawValue = rawValue }
    @inlinable public init(_ rawValue: UInt64) { self.rawValue = rawValue }

    @inlinable public static func < (lhs: GuestAddress, rhs: GuestAddress) -> Bool { lhs.rawValue < rhs.rawValue }

    /// `self + offset`, or nil when that overflows 64 bits.
    @inlinable public func advanced(by offset: UInt64) -> GuestAddress? {
        let (sum, overflow) = rawValue.addingReportingOverflow(offset)
        return overflow ? nil : GuestAddress(sum)
    }

    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// Errors from guest memory: the guest (or the frontend) asked for something outside what it shared.
public enum GuestMemoryError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `address + length` overflows 64 bits.
    case overflow(address: UInt64, length: UInt64)
    /// Some byte of the range lies in no region.
    case outOfRange(address: UInt64, length: UInt64)
    /// The range is in guest memory but not contiguous in one region where contiguity is required.
    case notContiguous(address: UInt64, length: UInt64)
    /// A region description is unusable (zero size, overlap, offset past the mapping...).
    case invalidRegion(String)
    /// More iovecs are needed than the caller's array holds.
    case tooManySegments(limit: Int)
    /// mmap or another call failed.
    case system(String)

    public var description: String {
        switch self {
        case let .overflow(a, l): "range 0x\(String(a, radix: 16))+\(l) overflows"
        case let .outOfRange(a, l): "range 0x\(String(a, radix: 16))+\(l) is outside guest memory"
        case let .notContiguous(a, l): "range 0x\(String(a, radix: 16))+\(l) crosses a region boundary"
        case let .invalidRegion(why): "invalid memory region: \(why)"
        case let .tooManySegments(limit): "more than \(limit) memory segments"
        case let .system(why): why
        }
    }
}
