import Synchronization

/// Why a frame was dropped; one counter each.
public enum DropReason: Int, CaseIterable, Sendable, CustomStringConvertible {
    /// A descriptor chain that broke the ring rules (returned to the guest unused).
    case badChain
    /// A transmitted header the device refused.
    case badHeader
    /// A non-GSO frame larger than the MTU.
    case oversize
    /// The backend refused the frame (kernel error).
    case backend
    /// The receive filter (MAC table, promiscuity) rejected it.
    case filtered
    /// The guest's buffers could not hold the frame.
    case tooLarge

    public var description: String {
        switch self {
        case .badChain: "bad_chain"
        case .badHeader: "bad_header"
        case .oversize: "oversize"
        case .backend: "backend"
        case .filtered: "filtered"
        case .tooLarge: "too_large"
        }
    }
}

/// One counter. A class so that a set of them can live in an array (Atomic cannot be copied).
public final class Counter: Sendable {
    let value = Atomic<UInt64>(0)
    public init() {}
    public var current: UInt64 { value.load(ordering: .relaxed) }
    /// Single writer: a relaxed load and store, no locked instruction on the data path.
    func add(_ amount: UInt64) {
        value.store(value.load(ordering: .relaxed) &+ amount, ordering: .relaxed)
    }
}

/// Counters of one virtqueue. One worker writes them (relaxed load + store, no locked instruction);
/// anyone may read them.
public final class QueueCounters: Sendable {
    public let frames = Counter()
    public let bytes = Counter()
    public let kicks = Counter()
    public let interrupts = Counter()
    private let drops: [Counter]

    public init() {
        drops = DropReason.allCases.map { _ in Counter() }
    }

    public func dropped(_ reason: DropReason) -> UInt64 { drops[reason.rawValue].current }
    public var totalDrops: UInt64 { drops.reduce(0) { $0 + $1.current } }

    func addFrames(_ count: Int, bytes byteCount: Int) {
        guard count > 0 else { return }
        frames.add(UInt64(count))
        bytes.add(UInt64(byteCount))
    }

    func countDrop(_ reason: DropReason, _ count: Int = 1) { drops[reason.rawValue].add(UInt64(count)) }
    func countKick() { kicks.add(1) }
    func countInterrupt() { interrupts.add(1) }

    /// A snapshot for tests and metrics.
    public var snapshot: Snapshot {
        Snapshot(
            frames: frames.current, bytes: bytes.current, kicks: kicks.current, interrupts: interrupts.current,
            drops: Dictionary(uniqueKeysWithValues: DropReason.allCases.map { ($0, dropped($0)) })
        )
    }

    public struct Snapshot: Sendable, Equatable {
        public var frames: UInt64
        public var bytes: UInt64
        public var kicks: UInt64
        public var interrupts: UInt64
        public var drops: [DropReason: UInt64]
    }
}
