#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Foundation
import GuestMemory
import NetworkTestSupport
import Synchronization
import Sys
import VirtioNet
import VirtioNetTestSupport
import Virtqueue

// The parts of the vhost-user stress test (VhostUserStressTests.swift) that are not about the
// protocol: settings, a seeded generator, tagged frames, a backend that checks PacketBackend's
// threading contract, guest memory with unique names, and the guest driver's side of a split ring.

// MARK: Settings

/// The seed and the length of the storm: fixed by default; the environment may change them.
struct StressSettings: Sendable, CustomStringConvertible {
    static let seedVariable = "VIRTIO_NET_STRESS_SEED"
    static let secondsVariable = "VIRTIO_NET_STRESS_SECONDS"
    static let defaultSeed: UInt64 = 0x5eed_7e57
    static let defaultSeconds = 3.0

    var seed: UInt64
    var seconds: Double

    /// VIRTIO_NET_STRESS_SEED (decimal or 0x-hex) and VIRTIO_NET_STRESS_SECONDS (0.1 to 86400).
    static func fromEnvironment() throws -> StressSettings {
        var settings = StressSettings(seed: defaultSeed, seconds: defaultSeconds)
        let environment = ProcessInfo.processInfo.environment
        if let text = environment[seedVariable] {
            let parsed = text.lowercased().hasPrefix("0x") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text)
            guard let parsed else { throw StressError("\(seedVariable)=\(text) is not a decimal or 0x-hex 64-bit number") }
            settings.seed = parsed
        }
        if let text = environment[secondsVariable] {
            guard let seconds = Double(text), seconds >= 0.1, seconds <= 86400 else {
                throw StressError("\(secondsVariable)=\(text) is not a number of seconds in 0.1...86400")
            }
            settings.seconds = seconds
        }
        return settings
    }

    var description: String { "seed 0x\(String(seed, radix: 16)), \(seconds) s" }
}

struct StressError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// SplitMix64: small, fast, and the same sequence for the same seed everywhere.
struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }

    static func mix(_ value: UInt64) -> UInt64 {
        var generator = SplitMix64(seed: value)
        return generator.next()
    }
}

// MARK: Violations

/// What went wrong, from any thread: each distinct message once, with how often it happened.
final class Violations: Sendable {
    private let state = Mutex<(order: [String], counts: [String: Int])>(([], [:]))
    private static let distinctLimit = 40

    func record(_ message: String) {
        state.withLock { state in
            if let count = state.counts[message] {
                state.counts[message] = count + 1
            } else if state.order.count < Self.distinctLimit {
                state.order.append(message)
                state.counts[message] = 1
            } else {
                state.counts["(more distinct violations not kept)", default: 0] += 1
            }
        }
    }

    var isEmpty: Bool { state.withLock { $0.counts.isEmpty } }

    var report: String {
        state.withLock { state in
            var lines = state.order.map { message in
                let count = state.counts[message] ?? 1
                return count > 1 ? "\(message) (\(count) times)" : message
            }
            if let more = state.counts["(more distinct violations not kept)"] { lines.append("and \(more) more distinct violations") }
            return lines.joined(separator: "\n")
        }
    }
}

// MARK: Tagged frames

/// The storm's frames: an Ethernet header, a tag naming the frame (who sent it, on which pair, its
/// sequence number, its length), then bytes derived from the tag and the seed. A receiver can tell
/// which frame it got and whether every byte is right.
enum TaggedFrame {
    enum Origin: UInt8, Sendable {
        /// Sent by the guest on a TX ring (and looped back by the backend).
        case guest = 1
        /// Put into the backend by the host side, for the guest's RX ring.
        case host = 2
    }

    struct Tag: Equatable, Sendable, CustomStringConvertible {
        var origin: Origin
        var pair: Int
        var sequence: Int
        var description: String { "\(origin == .guest ? "guest" : "host") frame \(sequence) of pair \(pair)" }
    }

    static let etherType: (UInt8, UInt8) = (0x88, 0xb5)  // IEEE local experimental
    static let magic: UInt32 = 0x5853_4e56
    static let patternStart = 30
    static let minimumLength = 60
    static let maximumLength = 1514

    static func hash(seed: UInt64, _ tag: Tag) -> UInt64 {
        SplitMix64.mix(seed ^ UInt64(tag.origin.rawValue) << 56 ^ UInt64(truncatingIfNeeded: tag.pair) << 48 ^ UInt64(truncatingIfNeeded: tag.sequence))
    }

    /// Minimum-size, full-size and everything between.
    static func length(seed: UInt64, _ tag: Tag) -> Int {
        let hash = hash(seed: seed, tag)
        switch hash % 8 {
        case 0: return minimumLength
        case 1: return maximumLength
        default: return minimumLength + Int((hash >> 8) % UInt64(maximumLength - minimumLength + 1))
        }
    }

    /// Writes the frame (no virtio-net header) at `pointer`; returns its length.
    @discardableResult
    static func write(seed: UInt64, _ tag: Tag, destination: MACAddress, to pointer: UnsafeMutableRawPointer) -> Int {
        let length = length(seed: seed, tag)
        let hash = hash(seed: seed, tag)
        let source = peerMAC.array
        for (index, byte) in destination.array.enumerated() { pointer.storeBytes(of: byte, toByteOffset: index, as: UInt8.self) }
        for (index, byte) in source.enumerated() { pointer.storeBytes(of: byte, toByteOffset: 6 + index, as: UInt8.self) }
        pointer.storeBytes(of: etherType.0, toByteOffset: 12, as: UInt8.self)
        pointer.storeBytes(of: etherType.1, toByteOffset: 13, as: UInt8.self)
        pointer.storeBytes(of: magic.littleEndian, toByteOffset: 14, as: UInt32.self)
        pointer.storeBytes(of: tag.origin.rawValue, toByteOffset: 18, as: UInt8.self)
        pointer.storeBytes(of: UInt8(truncatingIfNeeded: tag.pair), toByteOffset: 19, as: UInt8.self)
        pointer.storeBytes(of: UInt64(truncatingIfNeeded: tag.sequence).littleEndian, toByteOffset: 20, as: UInt64.self)
        pointer.storeBytes(of: UInt16(truncatingIfNeeded: length).littleEndian, toByteOffset: 28, as: UInt16.self)
        var offset = patternStart
        while offset + 8 <= length {
            pointer.storeBytes(of: (hash &+ UInt64(offset) &* 0x9e37_79b9_7f4a_7c15).littleEndian, toByteOffset: offset, as: UInt64.self)
            offset += 8
        }
        while offset < length {
            pointer.storeBytes(of: UInt8(truncatingIfNeeded: hash >> UInt64(8 * (offset & 7)) ^ UInt64(offset)), toByteOffset: offset, as: UInt8.self)
            offset += 1
        }
        return length
    }

    enum Parsed: Equatable {
        case tagged(Tag)
        case rarp
    }

    /// What a received frame is, or why it is not a frame of this test. `scratch` holds 2048 bytes.
    static func parse(seed: UInt64, _ frame: UnsafeRawPointer, length: Int, destination: MACAddress,
                      scratch: UnsafeMutableRawPointer) -> Result<Parsed, StressError> {
        guard length >= 14 else { return .failure(StressError("a \(length)-byte frame")) }
        let type = (frame.load(fromByteOffset: 12, as: UInt8.self), frame.load(fromByteOffset: 13, as: UInt8.self))
        if type == (0x80, 0x35) {
            return length == 60 ? .success(.rarp) : .failure(StressError("a RARP frame of \(length) bytes"))
        }
        guard type == etherType, length >= patternStart,
              UInt32(littleEndian: frame.loadUnaligned(fromByteOffset: 14, as: UInt32.self)) == magic,
              let origin = Origin(rawValue: frame.load(fromByteOffset: 18, as: UInt8.self))
        else { return .failure(StressError("an untagged \(length)-byte frame (type \(type))")) }
        let sequence = UInt64(littleEndian: frame.loadUnaligned(fromByteOffset: 20, as: UInt64.self))
        guard sequence < UInt64(Int32.max) else { return .failure(StressError("a frame with sequence number \(sequence)")) }
        let tag = Tag(origin: origin, pair: Int(frame.load(fromByteOffset: 19, as: UInt8.self)), sequence: Int(sequence))
        let expected = write(seed: seed, tag, destination: destination, to: scratch)
        guard expected == length else { return .failure(StressError("\(tag) is \(length) bytes, sent as \(expected)")) }
        if memcmp(frame, scratch, length) != 0 {
            let first = (0..<length).first { frame.load(fromByteOffset: $0, as: UInt8.self) != scratch.load(fromByteOffset: $0, as: UInt8.self) } ?? -1
            return .failure(StressError("\(tag) is corrupted from byte \(first) of \(length)"))
        }
        return .success(.tagged(tag))
    }
}

// MARK: A backend that checks the threading contract

/// A `LoopbackBackend` that checks `PacketBackend`'s threading contract: per-queue calls
/// (transmit, receive) come only from that queue pair's worker thread ("vnet-qpN"), never from two
/// threads at once. RARP frames, which the vhost-user layer sends itself, are counted apart and only
/// checked when `checkRARP` is set (VhostUserRARPContractTests).
final class ContractCheckingBackend: PacketBackend {
    let loopback: LoopbackBackend
    let violations: Violations
    let checkRARP: Bool
    private let inside: [Occupancy]
    private let rarp = Mutex<(sent: Int, threads: [String])>((0, []))

    private final class Occupancy: Sendable {
        let busy = Atomic<Bool>(false)
    }

    init(queuePairs: Int, violations: Violations, checkRARP: Bool = false) throws {
        loopback = try LoopbackBackend(queuePairs: queuePairs)
        self.violations = violations
        self.checkRARP = checkRARP
        inside = (0..<queuePairs).map { _ in Occupancy() }
    }

    var queuePairs: Int { loopback.queuePairs }
    var receiveOffloads: OffloadSet { loopback.receiveOffloads }
    var transmitOffloads: OffloadSet { loopback.transmitOffloads }
    func setReceiveOffloads(_ offloads: OffloadSet) throws(BackendError) { try loopback.setReceiveOffloads(offloads) }
    func setActiveQueuePairs(_ count: Int) throws(BackendError) { try loopback.setActiveQueuePairs(count) }
    func descriptor(queue: Int) -> Int32 { loopback.descriptor(queue: queue) }

    /// RARP frames that reached the backend, and the threads that sent them.
    var rarpFrames: (sent: Int, threads: [String]) { rarp.withLock { $0 } }

    func transmit(queue: Int, frame: UnsafeBufferPointer<iovec>) -> TransmitOutcome {
        if Self.isRARP(frame) && !checkRARP {
            let outcome = loopback.transmit(queue: queue, frame: frame)
            let thread = currentThreadName()
            rarp.withLock { state in
                if outcome == .sent { state.sent += 1 }
                if !state.threads.contains(thread) { state.threads.append(thread) }
            }
            return outcome
        }
        enter(queue, "transmit")
        defer { leave(queue) }
        let outcome = loopback.transmit(queue: queue, frame: frame)
        if Self.isRARP(frame) { rarp.withLock { $0.sent += outcome == .sent ? 1 : 0 } }
        return outcome
    }

    func receive(queue: Int, into buffers: UnsafeBufferPointer<iovec>) -> ReceiveOutcome {
        enter(queue, "receive")
        defer { leave(queue) }
        return loopback.receive(queue: queue, into: buffers)
    }

    private func enter(_ queue: Int, _ call: String) {
        let thread = currentThreadName()
        if thread != "vnet-qp\(queue)" {
            violations.record("PacketBackend.\(call)(queue: \(queue)) called from thread \"\(thread)\", not from that queue pair's worker")
        }
        if inside[queue].busy.exchange(true, ordering: .acquiringAndReleasing) {
            violations.record("two threads inside the backend's queue \(queue) at once (\(call) from \"\(thread)\")")
        }
    }

    private func leave(_ queue: Int) {
        inside[queue].busy.store(false, ordering: .releasing)
    }

    /// Ethertype 0x8035 after the 12-byte virtio-net header.
    private static func isRARP(_ frame: UnsafeBufferPointer<iovec>) -> Bool {
        var type: (UInt8, UInt8) = (0, 0)
        let copied = withUnsafeMutableBytes(of: &type) { IOVec.copyOut(frame, from: VirtioNetHeader.size + 12, into: $0) }
        return copied == 2 && type == (0x80, 0x35)
    }
}

/// glibc's pthread_getname_np, which Swift does not import; looked up once.
private struct GetThreadName: @unchecked Sendable {
    typealias Function = @convention(c) (pthread_t, UnsafeMutablePointer<CChar>?, Int) -> Int32
    let function: Function?
    static let shared = GetThreadName(function: dlsym(nil, "pthread_getname_np").map { unsafeBitCast($0, to: Function.self) })
}

/// The calling thread's name (15 bytes at most).
func currentThreadName() -> String {
    var buffer = [CChar](repeating: 0, count: 16)
    if let function = GetThreadName.shared.function, function(pthread_self(), &buffer, buffer.count) == 0 {
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
    let comm = (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? "?"
    return comm.trimmingCharacters(in: .newlines)
}

// MARK: Guest memory

/// Guest RAM for the stress test: two 2 MiB memfd regions with names unique to this run (so that
/// /proc tells which descriptors and mappings are the backend's copies), plus an extra 1 MiB region
/// the guest never uses, for ADD_MEM_REG and REM_MEM_REG.
final class StressMemory: Sendable {
    static let regionSize = 2 << 20
    static let extraSize = 1 << 20
    static let base: UInt64 = 0x10_0000
    static let userOffset: UInt64 = 0x7f00_0000_0000

    private final class File: Sendable {
        let name: String
        let fd: OwnedFileDescriptor
        init(name: String, size: Int) throws {
            self.name = name
            fd = try MemFD.create(name: name, size: size)
        }
    }

    private let files: [File]
    private let extraFile: File
    let memory: GuestMemory
    /// The two regions the guest uses, as a frontend describes them, and their descriptors.
    let regions: [Frontend.Region]
    let extra: Frontend.Region
    var fds: [Int32] { files.map { $0.fd.rawValue } }
    var extraFD: Int32 { extraFile.fd.rawValue }
    var names: [String] { files.map(\.name) }
    var extraName: String { extraFile.name }
    private static let counter = Atomic<Int>(0)

    init() throws {
        let unique = "\(getpid())-\(Self.counter.add(1, ordering: .relaxed).newValue)-\(UInt32.random(in: 0...UInt32.max))"
        files = try (0..<2).map { try File(name: "vu-stress-\(unique)-\($0)", size: Self.regionSize) }
        extraFile = try File(name: "vu-stress-\(unique)-extra", size: Self.extraSize)
        var mapped: [GuestMemoryRegion] = []
        var regions: [Frontend.Region] = []
        for (index, file) in files.enumerated() {
            let guest = Self.base + UInt64(index * Self.regionSize)
            mapped.append(try GuestMemoryRegion(description: MemoryRegionDescription(
                guestAddress: GuestAddress(guest), size: UInt64(Self.regionSize), userAddress: guest + Self.userOffset), fd: file.fd.rawValue))
            regions.append(Frontend.Region(guestAddress: guest, size: UInt64(Self.regionSize), userAddress: guest + Self.userOffset))
        }
        memory = try GuestMemory(regions: mapped)
        self.regions = regions
        let extraGuest = Self.base + UInt64(2 * Self.regionSize)
        extra = Frontend.Region(guestAddress: extraGuest, size: UInt64(Self.extraSize), userAddress: extraGuest + Self.userOffset)
    }

    /// The guest address `offset` bytes into region `region`.
    static func address(region: Int, offset: Int) -> UInt64 { base + UInt64(region * regionSize + offset) }

    func host(_ address: UInt64, length: Int) throws -> UnsafeMutableRawPointer {
        try memory.hostPointer(GuestAddress(address), length: UInt64(length))
    }
}

// MARK: The guest's side of a split ring

/// The driver's side of one split ring, for the stress test. Buffers never move: chain head H owns
/// the 2048 bytes at `pool + 2048 * H` (and the indirect table at `tables + 32 * H`) while it is
/// outstanding, so nothing is allocated while the storm runs, and what a used entry names can be
/// checked exactly: its head must be outstanding, and then it no longer is.
///
/// Used by one thread at a time: its pair's guest thread, or the storm while the guests are paused.
final class GuestRing: @unchecked Sendable {
    enum Layout: CaseIterable {
        /// One descriptor for header and data.
        case single
        /// The 12-byte header in one descriptor, the rest in a second.
        case split
        /// The split chain in an indirect table.
        case indirect
    }

    enum Used {
        /// `token` is what `commit` was given for the head.
        case chain(head: UInt16, length: UInt32, token: Int)
        /// A used entry naming a head that was not outstanding (or past the table).
        case stray(head: UInt32, length: UInt32)
    }

    static let size = 256
    static let bufferSize = 2048

    let index: Int
    let descriptorTable: UInt64, availableRing: UInt64, usedRing: UInt64
    private let descriptors: UnsafeMutableRawPointer
    private let available: UnsafeMutableRawPointer
    private let used: UnsafeMutableRawPointer
    private let pool: UInt64
    private let poolHost: UnsafeMutableRawPointer
    private let tables: UInt64
    private let tablesHost: UnsafeMutableRawPointer

    private(set) var availableIndex: UInt16 = 0
    private(set) var lastSeenUsed: UInt16 = 0
    private var free: [UInt16]
    /// Per head: the token of the chain it heads (-1: not outstanding) and its second descriptor.
    private var tokens: [Int]
    private var seconds: [Int]
    private(set) var outstanding = 0

    /// Ring `index` of the device (2k receive, 2k+1 transmit): rings in region 0, buffers in region
    /// `index / 2`, indirect tables in region 0.
    init(index: Int, memory: StressMemory) throws {
        self.index = index
        let ringOffset = index * 0x4000
        descriptorTable = StressMemory.address(region: 0, offset: ringOffset)
        availableRing = StressMemory.address(region: 0, offset: ringOffset + 0x1000)
        usedRing = StressMemory.address(region: 0, offset: ringOffset + 0x2000)
        pool = StressMemory.address(region: index / 2, offset: 0x1_0000 + (index % 2) * Self.size * Self.bufferSize)
        tables = StressMemory.address(region: 0, offset: 0x18_0000 + index * 32 * Self.size)
        descriptors = try memory.host(descriptorTable, length: 16 * Self.size)
        available = try memory.host(availableRing, length: 6 + 2 * Self.size)
        used = try memory.host(usedRing, length: 6 + 8 * Self.size)
        poolHost = try memory.host(pool, length: Self.size * Self.bufferSize)
        tablesHost = try memory.host(tables, length: 32 * Self.size)
        free = []
        tokens = []
        seconds = []
        reset()
    }

    func userAddress(_ guest: UInt64) -> UInt64 { guest + StressMemory.userOffset }

    var freeDescriptors: Int { free.count }

    /// The buffer of chain `head`.
    func buffer(_ head: UInt16) -> UnsafeMutableRawPointer { poolHost + Self.bufferSize * Int(head) }

    /// Descriptors a chain of `layout` takes from the table.
    static func descriptorsNeeded(_ layout: Layout) -> Int { layout == .split ? 2 : 1 }

    /// Takes descriptors for a chain; the caller fills `buffer(head)` and then calls `commit`.
    func reserve(_ layout: Layout) -> (head: UInt16, second: UInt16?)? {
        guard free.count >= Self.descriptorsNeeded(layout) else { return nil }
        let head = free.removeLast()
        return (head, layout == .split ? free.removeLast() : nil)
    }

    /// Writes the chain's descriptors (`length` bytes of the head's buffer, device-writable or not)
    /// and puts it in the available ring, unpublished.
    func commit(head: UInt16, second: UInt16?, layout: Layout, length: Int, writable: Bool, token: Int) {
        let flags: UInt16 = writable ? 2 : 0
        let address = pool + UInt64(Self.bufferSize * Int(head))
        let headerLength = VirtioNetHeader.size
        switch layout {
        case .single:
            writeDescriptor(descriptors, Int(head), address: address, length: length, flags: flags, next: 0)
        case .split:
            let next = second ?? 0
            writeDescriptor(descriptors, Int(head), address: address, length: headerLength, flags: flags | 1, next: next)
            writeDescriptor(descriptors, Int(next), address: address + UInt64(headerLength), length: length - headerLength, flags: flags, next: 0)
        case .indirect:
            let table = tablesHost + 32 * Int(head)
            writeDescriptor(table, 0, address: address, length: headerLength, flags: flags | 1, next: 1)
            writeDescriptor(table, 1, address: address + UInt64(headerLength), length: length - headerLength, flags: flags, next: 0)
            writeDescriptor(descriptors, Int(head), address: tables + UInt64(32 * Int(head)), length: 32, flags: 4, next: 0)
        }
        tokens[Int(head)] = token
        seconds[Int(head)] = second.map(Int.init) ?? -1
        outstanding += 1
        (available + 4 + 2 * (Int(availableIndex) % Self.size)).storeBytes(of: head.littleEndian, as: UInt16.self)
        availableIndex &+= 1
    }

    private func writeDescriptor(_ table: UnsafeMutableRawPointer, _ slot: Int, address: UInt64, length: Int, flags: UInt16, next: UInt16) {
        let entry = table + 16 * slot
        entry.storeBytes(of: address.littleEndian, as: UInt64.self)
        entry.storeBytes(of: UInt32(truncatingIfNeeded: length).littleEndian, toByteOffset: 8, as: UInt32.self)
        entry.storeBytes(of: flags.littleEndian, toByteOffset: 12, as: UInt16.self)
        entry.storeBytes(of: next.littleEndian, toByteOffset: 14, as: UInt16.self)
    }

    /// Makes the committed chains visible: one release store of avail.idx.
    func publish() {
        cvs_store_release_u16(available + 2, availableIndex.littleEndian)
    }

    /// Whether the device asked to be kicked for the chains from `old` on. Either kind of
    /// suppression may be in force (features change while the guest runs), so it kicks if either
    /// asks: used.flags without NO_NOTIFY, or avail_event crossed.
    func needsKick(since old: UInt16) -> Bool {
        cvs_fence_seq_cst()
        let flags = UInt16(littleEndian: cvs_load_acquire_u16(used))
        let availableEvent = UInt16(littleEndian: cvs_load_acquire_u16(used + 4 + 8 * Self.size))
        return flags & 1 == 0 || SplitQueue.needsEvent(eventIndex: availableEvent, new: availableIndex, old: old)
    }

    /// used.idx as the device published it.
    var usedIndex: UInt16 { UInt16(littleEndian: cvs_load_acquire_u16(used + 2)) }

    /// Takes the used entries published since the last call. Asks for an interrupt at the next one
    /// (used_event; the NO_INTERRUPT flag is never set).
    func reap(_ body: (Used) -> Void) -> Int {
        let published = usedIndex
        var count = 0
        while lastSeenUsed != published {
            let element = used + 4 + 8 * (Int(lastSeenUsed) % Self.size)
            let id = UInt32(littleEndian: element.loadUnaligned(as: UInt32.self))
            let length = UInt32(littleEndian: element.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
            lastSeenUsed &+= 1
            count += 1
            guard id < UInt32(Self.size), tokens[Int(id)] >= 0 else {
                body(.stray(head: id, length: length))
                continue
            }
            let head = Int(id)
            let token = tokens[head]
            tokens[head] = -1
            free.append(UInt16(head))
            if seconds[head] >= 0 { free.append(UInt16(seconds[head])) }
            seconds[head] = -1
            outstanding -= 1
            body(.chain(head: UInt16(head), length: length, token: token))
        }
        cvs_store_release_u16(available + 4 + 2 * Self.size, lastSeenUsed.littleEndian)
        return count
    }

    /// The tokens of the chains outstanding now (what a reset abandons).
    var outstandingTokens: [Int] { tokens.filter { $0 >= 0 } }

    /// A fresh ring, as a driver lays it out after a device reset: zeroed, every descriptor free.
    func reset() {
        memset(descriptors, 0, 16 * Self.size)
        memset(available, 0, 6 + 2 * Self.size)
        memset(used, 0, 6 + 8 * Self.size)
        free = (0..<UInt16(Self.size)).reversed()
        tokens = Array(repeating: -1, count: Self.size)
        seconds = Array(repeating: -1, count: Self.size)
        outstanding = 0
        availableIndex = 0
        lastSeenUsed = 0
    }
}

// MARK: Eventfds

/// The kick, call and error eventfds of every ring: the storm replaces them, the guest threads use
/// the kick and call ones. Replaced ones are kept open for a while (the last 32), so that the end of
/// the test can check that the backend closed its copies of them too.
final class RingEventFDs: Sendable {
    enum Kind: Int, CaseIterable { case kick, call, error }
    private let state: Mutex<(current: [[EventFD]], retired: [EventFD])>

    init(rings: Int) throws {
        var current: [[EventFD]] = []
        for _ in Kind.allCases { current.append(try (0..<rings).map { _ in try EventFD() }) }
        state = Mutex((current, []))
    }

    func kick(_ ring: Int) -> EventFD { self[.kick, ring] }
    func call(_ ring: Int) -> EventFD { self[.call, ring] }
    subscript(kind: Kind, ring: Int) -> EventFD { state.withLock { $0.current[kind.rawValue][ring] } }

    /// A new eventfd of `kind` for `ring`; the old one is retired.
    func replace(_ kind: Kind, _ ring: Int) throws -> EventFD {
        let fresh = try EventFD()
        state.withLock { state in
            state.retired.append(state.current[kind.rawValue][ring])
            state.current[kind.rawValue][ring] = fresh
            if state.retired.count > 32 { state.retired.removeFirst() }
        }
        return fresh
    }

    func replaceKick(_ ring: Int) throws -> EventFD { try replace(.kick, ring) }
    func replaceCall(_ ring: Int) throws -> EventFD { try replace(.call, ring) }

    /// Every eventfd held now: current and retired.
    var all: [EventFD] { state.withLock { $0.current.flatMap { $0 } + $0.retired } }
}

// MARK: /proc

enum ProcessView {
    /// Open descriptors of this process that are the same open file as `fd` (by /proc identity),
    /// other than `fd` itself.
    static func otherCopies(of fd: Int32, in descriptors: [Int32: ProcessResources.OpenFile]) -> [Int32] {
        guard let mine = descriptors[fd] else { return [] }
        return descriptors.filter { $0.key != fd && $0.value.identity == mine.identity }.map(\.key).sorted()
    }

    /// Inodes of unix sockets bound to `path` (listening or accepted), from /proc/net/unix.
    static func unixSocketInodes(path: String) -> Set<String> {
        guard let table = readProcFile("/proc/net/unix") else { return [] }
        var inodes: Set<String> = []
        for line in table.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            if fields.count >= 8, fields[7] == path { inodes.insert(String(fields[6])) }
        }
        return inodes
    }
}
