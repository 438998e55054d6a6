#if canImport(Glibc)
import Glibc
#endif
import Sys

/// Where one region of guest memory comes from: a file descriptor shared by the VMM, mapped whole.
public struct MemoryRegionDescription: Sendable {
    /// Guest-physical address of the first byte.
    public var guestAddress: GuestAddress
    public var size: UInt64
    /// The frontend's own virtual address of the first byte (vhost-user rings are given in these).
    public var userAddress: UInt64
    /// Where the region starts inside the file.
    public var mmapOffset: UInt64

    public init(guestAddress: GuestAddress, size: UInt64, userAddress: UInt64 = 0, mmapOffset: UInt64 = 0) {
        self.guestAddress = guestAddress
        self.size = size
        self.userAddress = userAddress
        self.mmapOffset = mmapOffset
    }
}

/// One mapped region. `host` points at the region's first byte inside `mapping`.
// Holds the host pointer of a mapping that `mapping` keeps alive; the pointer itself is immutable.
public struct GuestMemoryRegion: @unchecked Sendable {
    public let description: MemoryRegionDescription
    public let mapping: MemoryMapping
    public let host: UnsafeMutableRawPointer

    /// Exclusive ends, checked at construction not to overflow.
    @usableFromInline let guestStart: UInt64
    @usableFromInline let guestEnd: UInt64
    @usableFromInline let userStart: UInt64
    @usableFromInline let userEnd: UInt64

    /// Maps the part of `fd` that `description` covers (from `mmapOffset`, `size` bytes, widened to
    /// the file's page size); the fd may be closed afterwards. The mapping is guarded: if the file
    /// shrinks later, accesses past its end read zeros and count as `faults` instead of killing the
    /// process (SIGBUS).
    public init(description: MemoryRegionDescription, fd: Int32) throws(GuestMemoryError) {
        guard description.size > 0 else { throw .invalidRegion("size is 0") }
        let (end, overflow) = description.mmapOffset.addingReportingOverflow(description.size)
        guard !overflow else { throw .invalidRegion("mmap offset + size overflows") }
        // Mapping past the end of the file would succeed and then fault (SIGBUS) on first access.
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .system("fstat of the region's file failed (errno \(errno))") }
        let isRegularFile = info.st_mode & S_IFMT == S_IFREG
        guard !isRegularFile || UInt64(max(0, info.st_size)) >= end else {
            throw .invalidRegion("offset \(description.mmapOffset) + size \(description.size) is past the end of its \(info.st_size)-byte file")
        }
        // A hugetlbfs file maps in huge pages (its block size); anything else in base pages.
        let basePage = UInt64(max(4096, sysconf(Int32(_SC_PAGESIZE))))
        let blockSize = UInt64(max(0, info.st_blksize))
        let page = isRegularFile && blockSize > basePage && blockSize <= 1 << 30 && blockSize & (blockSize - 1) == 0 ? blockSize : basePage
        let mapStart = description.mmapOffset & ~(page - 1)
        let (roundedEnd, roundOverflow) = end.addingReportingOverflow(page - 1)
        guard !roundOverflow, let length = Int(exactly: (roundedEnd & ~(page - 1)) - mapStart) else {
            throw .invalidRegion("mmap offset + size overflows")
        }
        let mapping: MemoryMapping
        do {
            mapping = try MemoryMapping(fd: fd, offset: mapStart, length: length, pageSize: Int(page), guarded: true)
        } catch {
            throw .system("cannot map region at \(description.guestAddress): \(error)")
        }
        try self.init(description: description, mapping: mapping, offsetInMapping: description.mmapOffset - mapStart)
    }

    /// Uses an existing mapping of the whole file; the region starts `mmapOffset` bytes into it.
    public init(description: MemoryRegionDescription, mapping: MemoryMapping) throws(GuestMemoryError) {
        try self.init(description: description, mapping: mapping, offsetInMapping: description.mmapOffset)
    }

    private init(description: MemoryRegionDescription, mapping: MemoryMapping, offsetInMapping: UInt64) throws(GuestMemoryError) {
        guard description.size > 0 else { throw .invalidRegion("size is 0") }
        let (end, overflow) = offsetInMapping.addingReportingOverflow(description.size)
        guard !overflow, end <= UInt64(mapping.length) else {
            throw .invalidRegion("offset \(description.mmapOffset) + size \(description.size) exceeds the mapping")
        }
        let (guestEnd, guestOverflow) = description.guestAddress.rawValue.addingReportingOverflow(description.size)
        let (userEnd, userOverflow) = description.userAddress.addingReportingOverflow(description.size)
        guard !guestOverflow, !userOverflow else { throw .invalidRegion("region end overflows 64 bits") }
        self.description = description
        self.mapping = mapping
        self.host = mapping.base + Int(offsetInMapping)
        self.guestStart = description.guestAddress.rawValue
        self.guestEnd = guestEnd
        self.userStart = description.userAddress
        self.userEnd = userEnd
    }
}

/// The guest's memory as the device sees it: a few mapped regions and bounds-checked translation.
///
/// All translation is overflow-safe; a range must lie wholly inside guest memory. The memory is shared
/// with the guest, which may change it at any moment: callers copy what they validate.
public final class GuestMemory: Sendable {
    public let regions: [GuestMemoryRegion]

    /// Regions must not overlap in guest-physical space (nor in the frontend's address space).
    public init(regions: [GuestMemoryRegion]) throws(GuestMemoryError) {
        let sorted = regions.sorted { $0.guestStart < $1.guestStart }
        for (previous, next) in zip(sorted, sorted.dropFirst()) where next.guestStart < previous.guestEnd {
            throw .invalidRegion("regions at \(previous.description.guestAddress) and \(next.description.guestAddress) overlap")
        }
        let byUser = regions.sorted { $0.userStart < $1.userStart }
        for (previous, next) in zip(byUser, byUser.dropFirst()) where next.userStart < previous.userEnd {
            // Only meaningful when user addresses are given (vhost-user); all-zero user addresses are
            // the library case and never looked up.
            if previous.userStart != 0 || next.userStart != 0 {
                throw .invalidRegion("user addresses 0x\(String(previous.userStart, radix: 16)) and 0x\(String(next.userStart, radix: 16)) overlap")
            }
        }
        self.regions = sorted
    }

    /// Total bytes of guest memory.
    public var size: UInt64 { regions.reduce(0) { $0 + $1.description.size } }

    /// Accesses that found a region's file shrunk under its mapping (see `GuestMemoryRegion`): once
    /// non-zero, the frontend took memory away and the device must stop using it.
    public var faults: UInt64 { regions.reduce(0) { $0 + $1.mapping.faults } }

    /// The host address of `length` bytes at `address`, which must be contiguous in one region.
    @inlinable
    public func hostPointer(_ address: GuestAddress, length: UInt64) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        let start = address.rawValue
        let (end, overflow) = start.addingReportingOverflow(length)
        guard !overflow else { throw .overflow(address: start, length: length) }
        guard let index = regionIndex(containing: start) else { throw .outOfRange(address: start, length: length) }
        let region = regions[index]
        guard end <= region.guestEnd else {
            throw regionContaining(region.guestEnd) != nil
                ? .notContiguous(address: start, length: length)
                : .outOfRange(address: start, length: length)
        }
        return region.host + Int(start - region.guestStart)
    }

    /// The index of the region holding guest-physical `address`. Regions are sorted and disjoint: a
    /// few are scanned, many (a guest with memory hot-plugged in many DIMMs) are searched.
    @inlinable
    func regionIndex(containing address: UInt64) -> Int? {
        if regions.count <= 8 {
            for index in regions.indices where address >= regions[index].guestStart && address < regions[index].guestEnd {
                return index
            }
            return nil
        }
        // The last region starting at or below `address`, if it reaches it.
        var low = 0, high = regions.count
        while low < high {
            let middle = (low + high) / 2
            if regions[middle].guestStart <= address { low = middle + 1 } else { high = middle }
        }
        guard low > 0, address < regions[low - 1].guestEnd else { return nil }
        return low - 1
    }

    /// The host address of `length` bytes at a frontend (vhost-user) virtual address.
    public func hostPointer(userAddress: UInt64, length: UInt64) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        let (end, overflow) = userAddress.addingReportingOverflow(length)
        guard !overflow else { throw .overflow(address: userAddress, length: length) }
        for region in regions where userAddress >= region.userStart && userAddress < region.userEnd {
            guard end <= region.userEnd else { throw .notContiguous(address: userAddress, length: length) }
            return region.host + Int(userAddress - region.userStart)
        }
        throw .outOfRange(address: userAddress, length: length)
    }

    /// The guest-physical address of a host pointer into one of the regions (what the device wrote
    /// through an iovec, for dirty logging); nil if it points into none.
    public func guestAddress(host pointer: UnsafeRawPointer) -> UInt64? {
        let address = UInt(bitPattern: pointer)
        for region in regions {
            let start = UInt(bitPattern: region.host)
            if address >= start && UInt64(address - start) < region.description.size {
                return region.guestStart + UInt64(address - start)
            }
        }
        return nil
    }

    /// The guest-physical address for a frontend virtual address (for logging and ring addresses).
    public func guestAddress(userAddress: UInt64) -> GuestAddress? {
        for region in regions where userAddress >= region.userStart && userAddress < region.userEnd {
            return GuestAddress(region.guestStart + (userAddress - region.userStart))
        }
        return nil
    }

    @usableFromInline
    func regionContaining(_ address: UInt64) -> GuestMemoryRegion? {
        regionIndex(containing: address).map { regions[$0] }
    }

    /// Appends iovecs covering `length` bytes at `address`: one per region the range touches.
    /// Fails, appending nothing, when any byte is outside guest memory or `iovecs` would overflow.
    @inlinable
    public func appendIOVecs(_ address: GuestAddress, length: UInt64, to iovecs: inout IOVecArray) throws(GuestMemoryError) {
        var start = address.rawValue
        let (end, overflow) = start.addingReportingOverflow(length)
        guard !overflow else { throw .overflow(address: start, length: length) }
        if length == 0 { return }
        let rollback = iovecs.count
        while start < end {
            guard let index = regionIndex(containing: start) else {
                iovecs.count = rollback
                throw .outOfRange(address: address.rawValue, length: length)
            }
            let region = regions[index]
            let pieceEnd = min(end, region.guestEnd)
            guard iovecs.append(base: region.host + Int(start - region.guestStart), length: Int(pieceEnd - start)) else {
                iovecs.count = rollback
                throw .tooManySegments(limit: iovecs.capacity)
            }
            start = pieceEnd
        }
    }

    // MARK: Copies (control messages, headers, tests). Explicit little-endian, no struct overlays.

    /// Copies `buffer.count` bytes out of guest memory.
    public func read(into buffer: UnsafeMutableRawBufferPointer, from address: GuestAddress) throws(GuestMemoryError) {
        guard buffer.count > 0 else { return }
        var iovecs = IOVecArray(capacity: regions.count)
        try appendIOVecs(address, length: UInt64(buffer.count), to: &iovecs)
        _ = iovecs.copyOut(from: 0, into: buffer)
    }

    /// Copies `bytes` into guest memory.
    public func write(_ bytes: UnsafeRawBufferPointer, to address: GuestAddress) throws(GuestMemoryError) {
        guard bytes.count > 0 else { return }
        var iovecs = IOVecArray(capacity: regions.count)
        try appendIOVecs(address, length: UInt64(bytes.count), to: &iovecs)
        _ = iovecs.copyIn(bytes, at: 0)
    }

    public func readBytes(_ address: GuestAddress, count: Int) throws(GuestMemoryError) -> [UInt8] {
        var result = [UInt8](repeating: 0, count: count)
        var failure: GuestMemoryError?
        result.withUnsafeMutableBytes { buffer in
            do throws(GuestMemoryError) { try read(into: buffer, from: address) } catch { failure = error }
        }
        if let failure { throw failure }
        return result
    }

    public func writeBytes(_ bytes: [UInt8], to address: GuestAddress) throws(GuestMemoryError) {
        var failure: GuestMemoryError?
        bytes.withUnsafeBytes { buffer in
            do throws(GuestMemoryError) { try write(buffer, to: address) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    public func load<T: FixedWidthInteger>(_: T.Type, at address: GuestAddress) throws(GuestMemoryError) -> T {
        let pointer = try hostPointer(address, length: UInt64(MemoryLayout<T>.size))
        return T(littleEndian: pointer.loadUnaligned(as: T.self))
    }

    public func store<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(GuestMemoryError) {
        let pointer = try hostPointer(address, length: UInt64(MemoryLayout<T>.size))
        pointer.storeBytes(of: value.littleEndian, as: T.self)
    }
}
