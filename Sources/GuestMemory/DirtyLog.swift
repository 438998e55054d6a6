#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Synchronization
import Sys

/// A dirty-page log: one bit per 4 KiB page of guest-physical memory, bit `page % 8` of byte
/// `page / 8`, set with atomic ORs (the vhost-user log layout; VHOST_LOG_PAGE). While live migration
/// copies the guest's memory, the device marks every page it writes, so that the VMM sends it again.
///
/// Either shared with a vhost-user frontend (a memfd it passed with SET_LOG_BASE), or owned, for a VMM
/// that reads it with `collect()`.
public final class DirtyLog: @unchecked Sendable {
    public static let pageSize: UInt64 = 4096
    /// Bytes of bitmap: pages `0 ..< 8 * size` can be marked; marks past the end are dropped.
    public let size: Int
    private let bits: UnsafeMutableRawPointer
    private let mapping: MemoryMapping?

    /// An owned, zeroed log covering guest-physical addresses below `guestLimit`.
    public init(covering guestLimit: UInt64) {
        let pages = (guestLimit + Self.pageSize - 1) / Self.pageSize
        size = max(1, Int((pages + 7) / 8))
        bits = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
        bits.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        mapping = nil
    }

    /// A log in `size` bytes of `fd` from `offset` (vhost-user SET_LOG_BASE), mapped shared.
    public init(fd: Int32, size: UInt64, offset: UInt64) throws(GuestMemoryError) {
        guard size > 0, let length = Int(exactly: size), length <= Self.maximumSize else {
            throw .invalidRegion("dirty log of \(size) bytes (1...\(Self.maximumSize) allowed)")
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .system("fstat of the dirty log's file failed (errno \(errno))") }
        let (end, overflow) = offset.addingReportingOverflow(size)
        guard !overflow, info.st_mode & S_IFMT != S_IFREG || UInt64(max(0, info.st_size)) >= end else {
            throw .invalidRegion("dirty log at offset \(offset) + \(size) is past the end of its \(info.st_size)-byte file")
        }
        let page: UInt64 = 4096
        let start = offset & ~(page - 1)
        let mapped: MemoryMapping
        do {
            // Guarded like guest memory: a frontend that shrinks the file cannot kill the process.
            mapped = try MemoryMapping(fd: fd, offset: start, length: length + Int(offset - start), guarded: true)
        } catch {
            throw .system("cannot map the dirty log: \(error)")
        }
        self.size = length
        self.bits = mapped.base + Int(offset - start)
        self.mapping = mapped
    }

    /// A log covers at most 1 TiB of guest memory per 32 MiB of bitmap; this allows 64 TiB.
    public static let maximumSize = 2 << 30

    deinit {
        if mapping == nil { bits.deallocate() }
    }

    /// Marks the pages holding `length` bytes from guest-physical `address`.
    @inlinable
    public func mark(_ address: UInt64, length: UInt64) {
        guard length > 0 else { return }
        let first = address / Self.pageSize
        let (end, overflow) = address.addingReportingOverflow(length - 1)
        let last = overflow ? UInt64.max / Self.pageSize : end / Self.pageSize
        var page = first
        while page <= last {
            let byte = page / 8
            guard byte < UInt64(size) else { return }
            markByte(Int(byte), UInt8(1) << UInt8(page % 8))
            page += 1
        }
    }

    @usableFromInline
    func markByte(_ byte: Int, _ bit: UInt8) {
        cvs_atomic_or_u8(bits + byte, bit)
    }

    /// Whether the page holding `address` is marked.
    public func isDirty(_ address: UInt64) -> Bool {
        let page = address / Self.pageSize
        guard page / 8 < UInt64(size) else { return false }
        return bits.load(fromByteOffset: Int(page / 8), as: UInt8.self) & (1 << UInt8(page % 8)) != 0
    }

    /// The guest-physical addresses of the marked pages, in order; their marks are cleared (each
    /// byte taken atomically, so a page marked meanwhile is kept for the next call).
    public func collect() -> [UInt64] {
        var pages: [UInt64] = []
        for byte in 0..<size where bits.load(fromByteOffset: byte, as: UInt8.self) != 0 {
            let taken = cvs_atomic_exchange_u8(bits + byte, 0)
            for bit in 0..<8 where taken & (1 << UInt8(bit)) != 0 {
                pages.append((UInt64(byte) * 8 + UInt64(bit)) * Self.pageSize)
            }
        }
        return pages
    }
}

/// Whether a device logs the guest memory it writes, and into which log. Off costs one relaxed load
/// per check; on, each mark takes a lock, so that a log swapped for a new one (a VMM that resizes it)
/// is never marked after the swap returns.
public final class DirtyLogging: Sendable {
    @usableFromInline let enabled = Atomic<Bool>(false)
    private let log = Mutex<DirtyLog?>(nil)

    public init() {}

    @inlinable public var isEnabled: Bool { enabled.load(ordering: .relaxed) }

    /// Starts logging into `log` (or moves to it, if logging already).
    public func start(_ log: DirtyLog) {
        self.log.withLock { $0 = log }
        enabled.store(true, ordering: .relaxed)
    }

    /// Stops logging; returns once no mark is in progress.
    public func stop() {
        enabled.store(false, ordering: .relaxed)
        log.withLock { $0 = nil }
    }

    /// Runs `body` with the log, if logging is on (several marks under one lock).
    @inlinable
    public func withLog(_ body: (DirtyLog) -> Void) {
        guard isEnabled else { return }
        withLockedLog(body)
    }

    @usableFromInline
    func withLockedLog(_ body: (DirtyLog) -> Void) {
        log.withLock { log in
            if let log { body(log) }
        }
    }

    /// Marks `length` bytes at guest-physical `address`, if logging is on.
    @inlinable
    public func mark(_ address: UInt64, length: UInt64) {
        withLog { $0.mark(address, length: length) }
    }
}
