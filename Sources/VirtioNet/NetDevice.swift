import GuestMemory
import Logging
import Synchronization
import Sys
import Virtqueue

/// Where one virtqueue is and how it signals, as a VMM (or the vhost-user layer) describes it.
public struct QueueConfiguration: Sendable {
    /// The virtqueue index: 2k receive and 2k+1 transmit of pair k, then the control queue.
    public var index: Int
    public var size: Int
    public var rings: RingAddresses
    /// Where to resume, as vhost-user's vring base (GET_VRING_BASE's answer when restoring; nil for a
    /// fresh queue): a split ring's next available index; a packed ring's next available index with
    /// its wrap counter in bit 15 and its next used index with its wrap counter in bit 31.
    public var base: UInt32?
    /// The split ring's next available index: the low 16 bits of `base`.
    public var nextAvailableIndex: UInt16 {
        get { UInt16(truncatingIfNeeded: base ?? 0) }
        set { base = UInt32(newValue) }
    }
    /// Written by the driver when it adds buffers.
    public var kick: EventFD?
    /// Written by the device to interrupt the driver.
    public var call: EventFD?
    /// Written by the device when the guest breaks this ring (vhost-user SET_VRING_ERR).
    public var error: EventFD?
    /// Where the used ring is in guest-physical memory, for dirty logging of the device's writes to it:
    /// vhost-user's log address. With guest-physical ring addresses the used ring's is taken.
    public var usedRingLogAddress: UInt64?

    public init(index: Int, size: Int, rings: RingAddresses, nextAvailableIndex: UInt16? = nil, base: UInt32? = nil, kick: EventFD? = nil,
                call: EventFD? = nil, error: EventFD? = nil, usedRingLogAddress: UInt64? = nil) {
        self.error = error
        self.usedRingLogAddress = usedRingLogAddress
        self.index = index
        self.size = size
        self.rings = rings
        self.base = base ?? nextAvailableIndex.map(UInt32.init)
        self.kick = kick
        self.call = call
    }
}

/// Where a queue stopped, to resume it later (vhost-user GET_VRING_BASE, save/restore).
public struct QueueState: Equatable, Sendable {
    public var index: Int
    /// vhost-user's vring base (see `QueueConfiguration.base`).
    public var base: UInt32
    /// The split ring's next available index: the low 16 bits of `base`.
    public var nextAvailableIndex: UInt16 { UInt16(truncatingIfNeeded: base) }

    public init(index: Int, base: UInt32) {
        self.index = index
        self.base = base
    }

    public init(index: Int, nextAvailableIndex: UInt16) {
        self.init(index: index, base: UInt32(nextAvailableIndex))
    }
}

/// The counters of one queue pair, kept across resets for metrics.
public final class QueuePairCounters: Sendable {
    public let receive = QueueCounters()
    public let transmit = QueueCounters()
}

/// The queues of an activated device. Engines are driven by one thread at a time: their pair's
/// worker, or the caller of `poll()`. Changed only with every worker of the pairs involved stopped.
final class ActiveQueues: @unchecked Sendable {
    var memory: GuestMemory
    let drive: DriveMode
    let features: VirtioNetFeatures
    var receive: [(any ReceiveEngine)?]
    var transmit: [(any FrameEngine)?]
    var control: (any ControlEngine)?
    /// What each running queue was started with (its kick, call and error eventfds among it).
    var configurations: [Int: QueueConfiguration] = [:]
    var workers: [Int: QueuePairWorker] = [:]
    let controlIndex: Int
    /// Frames to announce the device with, sent by whoever owns queue pair 0 (its worker, or poll()).
    let announcements: Announcements

    init(memory: GuestMemory, drive: DriveMode, features: VirtioNetFeatures, pairs: Int, controlIndex: Int,
         announcements: Announcements) {
        self.memory = memory
        self.drive = drive
        self.features = features
        self.controlIndex = controlIndex
        self.announcements = announcements
        receive = Array(repeating: nil, count: pairs)
        transmit = Array(repeating: nil, count: pairs)
    }

    var kicks: [Int: EventFD] { configurations.compactMapValues(\.kick) }
    var errors: [Int: EventFD] { configurations.compactMapValues(\.error) }

    /// The queue pair a virtqueue belongs to (the control queue goes with pair 0's worker).
    func pair(of index: Int) -> Int { index == controlIndex ? 0 : index / 2 }
}

/// Who runs the queues of an active device.
public enum DriveMode: Sendable {
    /// One worker thread per queue pair, woken by the kick eventfds and the backend (the default).
    case workerThreads
    /// The caller, through `poll()` (for VMMs with their own event loop, and for tests).
    case manual
}

/// A virtio-net device (virtio 1.2, 5.1) in front of a `PacketBackend`.
///
/// A VMM creates it with a configuration and a backend, advertises `offeredFeatures`, passes on the
/// driver's `acknowledge(features:)`, serves config space reads from `configSpace`, and calls
/// `activate(memory:queues:)` when the driver sets DRIVER_OK. `reset()` stops the device and returns
/// where each queue stopped.
public final class NetDevice: Sendable {
    public let configuration: NetConfiguration
    public let backend: any PacketBackend
    /// Everything the device can honour with this backend and configuration.
    public let offeredFeatures: VirtioNetFeatures
    public let queuePairCounters: [QueuePairCounters]
    public let controlCounters = QueueCounters()
    let logger: Logger
    let filterCell: FilterCell
    let dirtyLogging = DirtyLogging()

    private struct State {
        var negotiated: VirtioNetFeatures?
        /// The last set acknowledged, kept across resets.
        var lastAcknowledged: VirtioNetFeatures?
        var control = ControlState()
        var needsReset = false
        var linkUp = true
        var active: ActiveQueues?
        var mtu: Int
    }
    private let state: Mutex<State>
    /// Held for the whole of each change to the running queues (activate, start, stop, memory,
    /// reset), so that they happen one at a time whichever threads ask.
    private let changes = Mutex<Void>(())
    /// Workers that exist now (each holds an epoll instance and a stop eventfd).
    private let workerCount = Atomic<Int>(0)

    public init(configuration: NetConfiguration, backend: any PacketBackend, logger: Logger = Logger(label: "virtio-net")) throws(NetDeviceError) {
        try configuration.validate()
        guard configuration.queuePairs <= backend.queuePairs else {
            throw .invalidConfiguration("\(configuration.queuePairs) queue pairs configured, the backend has \(backend.queuePairs)")
        }
        self.configuration = configuration
        self.state = Mutex(State(mtu: configuration.mtu))
        self.backend = backend
        self.logger = logger
        self.filterCell = FilterCell(mac: configuration.mac)
        self.queuePairCounters = (0..<configuration.queuePairs).map { _ in QueuePairCounters() }

        let allowed = configuration.offloads ?? .all
        var features: VirtioNetFeatures = [.version1, .mac, .mtu, .status, .ctrlVQ, .ctrlRx, .ctrlMACAddress]
        features.formUnion(allowed.intersection(backend.receiveOffloads).guestFeatures)
        features.formUnion(allowed.intersection(backend.transmitOffloads).hostFeatures)
        if !features.isDisjoint(with: .guestOffloads) { features.insert(.ctrlGuestOffloads) }
        if configuration.queuePairs > 1 { features.insert(.mq) }
        if configuration.mergeableRxBuffers { features.insert(.mergeableRxBuffers) }
        if configuration.eventIndex { features.insert(.eventIndex) }
        if configuration.indirectDescriptors { features.insert(.indirectDescriptors) }
        if configuration.packedRings { features.insert(.ringPacked) }
        if configuration.inOrder { features.insert(.inOrder) }
        self.offeredFeatures = features
    }

    /// What the driver acknowledged; nil before `acknowledge(features:)` and after `reset()`.
    public var negotiatedFeatures: VirtioNetFeatures? { state.withLock { $0.negotiated } }

    /// What the device uses of the acknowledged features: those without their prerequisites left out.
    public var effectiveFeatures: VirtioNetFeatures? { negotiatedFeatures?.usable.features }

    /// Set when the guest broke a ring: DEVICE_NEEDS_RESET. Cleared by `reset()`.
    public var needsReset: Bool { state.withLock { $0.needsReset } }

    public var isActive: Bool { state.withLock { $0.active != nil } }

    /// Descriptors the device itself holds now: an epoll instance and a stop eventfd per worker
    /// thread. (Ring eventfds belong to whoever passed them in; the backend counts its own.)
    public var descriptorCount: Int { 2 * workerCount.load(ordering: .relaxed) }

    /// The virtqueue index of the control queue under `features`.
    public func controlQueueIndex(features: VirtioNetFeatures) -> Int {
        features.contains(.mq) ? 2 * configuration.queuePairs : 2
    }

    /// The device-specific configuration space the driver reads.
    public var configSpace: NetConfigSpace {
        let (mac, (linkUp, mtu)) = (filterCell.current.mac, state.withLock { ($0.linkUp, $0.mtu) })
        return NetConfigSpace(
            mac: mac, status: linkUp ? NetConfigSpace.statusLinkUp : 0,
            maxVirtqueuePairs: UInt16(truncatingIfNeeded: configuration.queuePairs),
            mtu: UInt16(truncatingIfNeeded: mtu)
        )
    }

    /// The MTU the driver is told, and the limit for non-GSO frames on transmit. Starts as the
    /// configured one; a vhost-user frontend may set another (NET_SET_MTU) before activation.
    public var mtu: Int { state.withLock { $0.mtu } }

    /// Also sets the backend's MTU (a TAP's interface MTU).
    public func setMTU(_ mtu: Int) throws(NetDeviceError) {
        guard (NetConfiguration.minimumMTU...NetConfiguration.maximumMTU).contains(mtu) else {
            throw .invalidConfiguration("mtu \(mtu) is outside \(NetConfiguration.minimumMTU)...\(NetConfiguration.maximumMTU)")
        }
        do { try backend.setMTU(mtu) } catch { throw .backend(error.description) }
        state.withLock { $0.mtu = mtu }
    }

    /// The driver's FEATURES_OK: refused only if a feature was not offered. A legacy driver (no
    /// VERSION_1) is served with its header: 10 bytes without MRG_RXBUF, 12 with it. A feature whose
    /// prerequisites the driver left out is accepted but not used (see `VirtioNetFeatures.usable`);
    /// the device says so once in its log, at notice level.
    public func acknowledge(features: VirtioNetFeatures) throws(NetDeviceError) {
        let notOffered = features.subtracting(offeredFeatures)
        guard notOffered.isEmpty else { throw .featuresNotOffered(notOffered) }
        let (usable, ignored) = features.usable
        let firstTime = try state.withLock { (state) throws(NetDeviceError) -> Bool in
            guard state.active == nil else { throw .invalidState("features changed while the device is active") }
            // Once per set: rings restarted with the same features say nothing new.
            let firstTime = state.lastAcknowledged != features
            state.lastAcknowledged = features
            state.negotiated = features
            state.control = ControlState()
            state.control.guestOffloads = usable.intersection(.guestOffloads)
            return firstTime
        }
        if !ignored.isEmpty && firstTime {
            logger.notice("driver acknowledged features without their prerequisites; they are not used", metadata: [
                "ignored": "\(ignored)", "acknowledged": "\(features)",
            ])
        }
        filterCell.update { filter, mac in
            filter = ReceiveFilter()
            mac = configuration.mac
        }
        do {
            try backend.setHeaderSize(VirtioNetHeader.size(for: usable))
            try backend.setReceiveOffloads(OffloadSet(guestFeatures: usable))
            try backend.setActiveQueuePairs(1)
        } catch {
            throw .backend(error.description)
        }
    }

    /// Sets the link status the driver sees (VIRTIO_NET_S_LINK_UP).
    public func setLinkUp(_ up: Bool) {
        state.withLock { $0.linkUp = up }
    }

    /// The driver's DRIVER_OK: validates and maps every queue given, then starts the workers (with
    /// `.workerThreads`, every queue needs a kick eventfd). Queues not given stay stopped until
    /// `startQueues(_:)`; a vhost-user backend activates with none and starts rings one at a time.
    public func activate(memory: GuestMemory, queues: [QueueConfiguration], drive: DriveMode = .workerThreads) throws(NetDeviceError) {
        try changes.withLock { (_: inout Void) throws(NetDeviceError) in
            guard let features = effectiveFeatures else { throw .invalidState("activate before features were acknowledged") }
            let announcements: Announcements
            do { announcements = try Announcements() } catch { throw .backend("cannot create the announcement eventfd: \(error)") }
            let active = ActiveQueues(
                memory: memory, drive: drive, features: features, pairs: configuration.queuePairs,
                controlIndex: features.contains(.ctrlVQ) ? controlQueueIndex(features: features) : -1, announcements: announcements)
            try install(queues, in: active)
            try state.withLock { (state) throws(NetDeviceError) in
                guard state.active == nil else { throw .invalidState("already active") }
                state.active = active
            }
            do {
                for pair in Set(queues.map { active.pair(of: $0.index) }).sorted() { try restartWorker(pair: pair, of: active) }
            } catch {
                _ = stopEverything(active)
                state.withLock { $0.active = nil }
                throw .backend("cannot start queue workers: \(error)")
            }
        }
    }

    /// Starts more queues of an active device. Only their pairs' workers restart (each keeps its
    /// other queue, positions and cached buffers); the other pairs run on undisturbed. A queue that
    /// is running already must be stopped first.
    public func startQueues(_ queues: [QueueConfiguration]) throws(NetDeviceError) {
        try changes.withLock { (_: inout Void) throws(NetDeviceError) in
            guard let active = state.withLock({ $0.active }) else { throw .invalidState("start queues of an inactive device") }
            for queue in queues where active.configurations[queue.index] != nil {
                throw .invalidQueue(index: queue.index, "already running")
            }
            let pairs = Set(queues.map { active.pair(of: $0.index) }).sorted()
            for pair in pairs { stopWorker(pair: pair, of: active) }
            var failure: NetDeviceError? = nil
            do throws(NetDeviceError) { try install(queues, in: active) } catch { failure = error }
            for pair in pairs {
                do throws(SystemError) { try restartWorker(pair: pair, of: active) } catch {
                    failure = failure ?? .backend("cannot start the worker of queue pair \(pair): \(error)")
                }
            }
            if let failure { throw failure }
        }
    }

    /// Stops some queues of an active device and returns where each stopped (receive buffers cached
    /// but unused go back to the ring first). Only their pairs' workers restart; others run on.
    @discardableResult
    public func stopQueues(_ indices: [Int]) -> [QueueState] {
        changes.withLock { _ in
            guard let active = state.withLock({ $0.active }) else { return [] }
            let running = indices.filter { active.configurations[$0] != nil }
            let pairs = Set(running.map { active.pair(of: $0) }).sorted()
            for pair in pairs { stopWorker(pair: pair, of: active) }
            let states = running.map { uninstall($0, from: active) }
            for pair in pairs {
                do { try restartWorker(pair: pair, of: active) } catch {
                    logger.error("cannot restart a queue pair's worker", metadata: ["pair": "\(pair)", "error": "\(error)"])
                }
            }
            return states.sorted { $0.index < $1.index }
        }
    }

    /// The queues running now (virtqueue indices).
    public var runningQueues: [Int] { state.withLock { $0.active.map { Array($0.configurations.keys).sorted() } ?? [] } }

    /// A queue that could not start again after a change to all of them: where it stopped, and why.
    public struct StoppedQueue: Sendable {
        public var state: QueueState
        public var error: NetDeviceError
    }

    /// Moves every running queue to new guest memory (regions added or removed), each at the position
    /// it reached: the workers stop for the change, the backend is not touched. A queue whose rings no
    /// longer lie in memory stays stopped: those are returned, with where they stopped and why.
    @discardableResult
    public func replaceMemory(_ memory: GuestMemory) -> [StoppedQueue] {
        restartRunningQueues(memory: memory)
    }

    /// Restarts every running queue at its position with the device's current MTU (after `setMTU`);
    /// returns those that could not start again.
    @discardableResult
    public func restartQueues() -> [StoppedQueue] {
        restartRunningQueues(memory: nil)
    }

    private func restartRunningQueues(memory: GuestMemory?) -> [StoppedQueue] {
        changes.withLock { _ in
            guard let active = state.withLock({ $0.active }) else { return [] }
            for pair in Array(active.workers.keys) { stopWorker(pair: pair, of: active) }
            var queues: [QueueConfiguration] = []
            for index in active.configurations.keys.sorted() {
                guard var queue = active.configurations[index] else { continue }
                queue.base = uninstall(index, from: active).base
                queues.append(queue)
            }
            if let memory { active.memory = memory }
            var stopped: [StoppedQueue] = []
            for queue in queues {
                do throws(NetDeviceError) { try install([queue], in: active) } catch {
                    stopped.append(StoppedQueue(state: QueueState(index: queue.index, base: queue.base ?? 0), error: error))
                }
            }
            for pair in Set(queues.map { active.pair(of: $0.index) }).sorted() {
                do throws(SystemError) { try restartWorker(pair: pair, of: active) } catch {
                    // Without a worker its queues cannot run: stop them where they are.
                    for index in active.configurations.keys.sorted() where active.pair(of: index) == pair {
                        stopped.append(StoppedQueue(state: uninstall(index, from: active),
                                                    error: .backend("cannot start the worker of queue pair \(pair): \(error)")))
                    }
                }
            }
            return stopped
        }
    }

    /// Validates, maps and builds the engines of `queues` into `active` (their workers stopped);
    /// nothing is installed if any is refused.
    private func install(_ queues: [QueueConfiguration], in active: ActiveQueues) throws(NetDeviceError) {
        let pairs = configuration.queuePairs
        let features = active.features
        let ringFeatures = RingFeatures(
            eventIndex: features.contains(.eventIndex), indirectDescriptors: features.contains(.indirectDescriptors))
        let mtu = self.mtu
        var seen = Set<Int>()
        let packed = features.contains(.ringPacked)
        var built: [(QueueConfiguration, any DeviceQueue)] = []
        for queue in queues {
            guard queue.index >= 0, queue.index < 2 * pairs || queue.index == active.controlIndex else {
                throw .invalidQueue(index: queue.index, "no such queue")
            }
            guard seen.insert(queue.index).inserted else { throw .invalidQueue(index: queue.index, "given twice") }
            guard queue.size <= configuration.maximumQueueSize else {
                throw .invalidQueue(index: queue.index, "size \(queue.size) exceeds the maximum \(configuration.maximumQueueSize)")
            }
            guard queue.kick != nil || active.drive == .manual else {
                throw .invalidQueue(index: queue.index, "a kick eventfd is needed for worker threads")
            }
            do throws(QueueSetupError) {
                if packed {
                    built.append((queue, try PackedQueue(memory: active.memory, size: queue.size, rings: queue.rings,
                                                         features: ringFeatures, base: queue.base ?? PackedQueue.freshBase)))
                } else {
                    let base = queue.base ?? 0
                    guard let next = UInt16(exactly: base) else { throw QueueSetupError.invalidBase(base) }
                    var ring = try SplitQueue(memory: active.memory, size: queue.size, rings: queue.rings,
                                              features: ringFeatures, nextAvailableIndex: next)
                    if let address = queue.usedRingLogAddress { ring.usedLogAddress = address }
                    built.append((queue, ring))
                }
            } catch {
                throw .queueSetup(index: queue.index, error)
            }
        }
        for (queue, ring) in built {
            installEngine(queue, ring: ring, in: active, features: features, mtu: mtu)
            active.configurations[queue.index] = queue
        }
    }

    /// Builds the engine of `queue`, specialised for its ring layout.
    private func installEngine<Ring: DeviceQueue>(_ queue: QueueConfiguration, ring: Ring, in active: ActiveQueues,
                                                 features: VirtioNetFeatures, mtu: Int) {
        if queue.index == active.controlIndex {
            active.control = ControlQueueEngine(
                index: queue.index, ring: ring, call: queue.call, counters: controlCounters, logger: logger,
                logging: dirtyLogging, execute: { [weak self] command in self?.executeControl(command) ?? .error })
        } else if queue.index % 2 == 0 {
            let pair = queue.index / 2
            active.receive[pair] = ReceiveQueue(
                index: queue.index, backendQueue: pair, ring: ring, call: queue.call,
                counters: queuePairCounters[pair].receive, features: features, mtu: mtu, filter: filterCell, logger: logger,
                logging: dirtyLogging)
        } else {
            let pair = queue.index / 2
            active.transmit[pair] = TransmitQueue(
                index: queue.index, backendQueue: pair, ring: ring, call: queue.call,
                counters: queuePairCounters[pair].transmit, features: features, mtu: mtu, logger: logger,
                logging: dirtyLogging)
        }
    }

    /// Takes queue `index` out of `active` (its worker stopped) and says where it stopped.
    private func uninstall(_ index: Int, from active: ActiveQueues) -> QueueState {
        defer { active.configurations[index] = nil }
        if index == active.controlIndex, let control = active.control {
            active.control = nil
            return QueueState(index: index, base: control.base)
        }
        let pair = index / 2
        if index % 2 == 0, let receive = active.receive[pair] {
            receive.returnCachedChains()
            active.receive[pair] = nil
            return QueueState(index: index, base: receive.base)
        }
        if let transmit = active.transmit[pair] {
            active.transmit[pair] = nil
            return QueueState(index: index, base: transmit.base)
        }
        return QueueState(index: index, base: active.configurations[index]?.base ?? 0)
    }

    private func stopWorker(pair: Int, of active: ActiveQueues) {
        guard let worker = active.workers.removeValue(forKey: pair) else { return }
        worker.stop()
        workerCount.subtract(1, ordering: .relaxed)
    }

    /// Starts a worker for `pair` if it has queues (stopping the one it had first).
    private func restartWorker(pair: Int, of active: ActiveQueues) throws(SystemError) {
        stopWorker(pair: pair, of: active)
        guard active.drive == .workerThreads else { return }
        let control = pair == 0 ? active.control : nil
        guard active.receive[pair] != nil || active.transmit[pair] != nil || control != nil else { return }
        let kicks = active.kicks
        // The worker's own copy: the device's tables change while other pairs' workers run.
        let errors = active.errors.filter { active.pair(of: $0.key) == pair }
        let worker = try QueuePairWorker(
            pair: pair, receive: active.receive[pair], transmit: active.transmit[pair], control: control,
            receiveKick: kicks[2 * pair], transmitKick: kicks[2 * pair + 1],
            controlKick: control.flatMap { kicks[$0.index] },
            counters: queuePairCounters[pair], controlCounters: controlCounters,
            announcements: pair == 0 ? active.announcements : nil, memory: active.memory, backend: backend,
            onBroken: { [weak self] queue, fault in self?.markBroken(queue: queue, fault, error: errors[queue]) },
            logger: logger)
        active.workers[pair] = worker
        workerCount.add(1, ordering: .relaxed)
        try worker.start()
    }

    /// Stops every worker and takes every queue out; where each stopped.
    private func stopEverything(_ active: ActiveQueues) -> [QueueState] {
        for pair in Array(active.workers.keys) { stopWorker(pair: pair, of: active) }
        return active.configurations.keys.sorted().map { uninstall($0, from: active) }
    }

    deinit {
        if let active = state.withLock({ $0.active }) {
            for worker in active.workers.values { worker.stop() }
        }
    }

    /// Stops the device and returns where each queue stopped. Features must be acknowledged again.
    @discardableResult
    public func reset() -> [QueueState] {
        changes.withLock { _ in
            let active = state.withLock { state -> ActiveQueues? in
                let active = state.active
                state.active = nil
                state.negotiated = nil
                state.needsReset = false
                state.control = ControlState()
                return active
            }
            guard let active else { return [] }
            let states = stopEverything(active)
            // A worker in the middle of its pass may have found a broken ring meanwhile: that ring
            // belonged to this activation, and this reset is what it asked for.
            state.withLock { $0.needsReset = false }
            return states
        }
    }

    /// Announces the guest at `mac` out of the backend (a RARP request, as after a live migration),
    /// so that bridges and switches learn its new port. The frame goes out on queue pair 0 from the
    /// thread that owns that queue: its worker, the next `poll()` in manual mode, or this thread when
    /// the device is not running.
    public func announce(mac: MACAddress) {
        let frame = Announcements.reverseARP(for: mac)
        changes.withLock { _ in
            if let active = state.withLock({ $0.active }), active.receive[0] != nil || active.transmit[0] != nil || active.control != nil {
                active.announcements.post(frame)
            } else {
                // No one owns queue 0, and no change to the queues can start while this lock is held.
                let announcements = try? Announcements()
                announcements?.post(frame)
                announcements?.send(through: backend, queue: 0)
            }
        }
    }

    /// The first `count` queue pairs carry traffic (what the driver's VQ_PAIRS_SET asks; a vhost-user
    /// frontend, which keeps the control queue, says it by enabling rings).
    public func setActiveQueuePairs(_ count: Int) throws(NetDeviceError) {
        guard (1...configuration.queuePairs).contains(count) else {
            throw .invalidConfiguration("\(count) active queue pairs; the device has \(configuration.queuePairs)")
        }
        do { try backend.setActiveQueuePairs(count) } catch { throw .backend(error.description) }
        state.withLock { $0.control.activeQueuePairs = count }
    }

    // MARK: Dirty logging (live migration)

    /// Logs every guest page the device writes from now on into `log` (or moves to it, if logging):
    /// frames and headers written into receive buffers, control acks, and used rings (at their
    /// `usedRingLogAddress`). A VMM migrating the guest starts this before copying memory, reads the
    /// log (`DirtyLog.collect()`) between passes and stops it once the device is stopped.
    public func startDirtyLogging(into log: DirtyLog) {
        dirtyLogging.start(log)
        logger.info("dirty logging started", metadata: ["log_bytes": "\(log.size)"])
    }

    /// Stops dirty logging; no mark is made after this returns.
    public func stopDirtyLogging() {
        guard dirtyLogging.isEnabled else { return }
        dirtyLogging.stop()
        logger.info("dirty logging stopped")
    }

    /// Whether the device logs the pages it writes.
    public var isLoggingDirtyPages: Bool { dirtyLogging.isEnabled }

    /// The receive filter as the control queue last set it.
    public var receiveFilter: ReceiveFilter { filterCell.current.filter }
    /// Queue pairs the driver enabled with VQ_PAIRS_SET (1 until it does).
    public var activeQueuePairs: Int { state.withLock { $0.control.activeQueuePairs } }

    // MARK: Driving the queues

    /// Runs every queue until nothing more can be done now, on the calling thread: for VMMs that
    /// drive the device from their own loop, and for tests. Kick eventfds, if any, are drained.
    /// A guest that keeps adding work cannot keep the caller here: after `pollRounds` passes of at
    /// most 256 chains per queue it returns, and the next call goes on.
    /// Returns false if the guest broke a ring (the device then needs a reset).
    @discardableResult
    public func poll() -> Bool {
        guard let active = state.withLock({ $0.active }), active.drive == .manual else { return !needsReset }
        for (index, kick) in active.kicks {
            if (try? kick.drain()) != nil { countKick(queue: index, controlIndex: active.controlIndex) }
        }
        active.announcements.send(through: backend, queue: 0)
        var healthy = true
        var progress = true
        var rounds = 0
        while progress && healthy && rounds < Self.pollRounds {
            progress = false
            rounds += 1
            if let control = active.control {
                let result = control.process(budget: 256)
                healthy = check(result, queue: control.index, in: active) && healthy
                if result == .budgetExhausted { progress = true }
            }
            for pair in 0..<configuration.queuePairs {
                if let queue = active.transmit[pair] {
                    let result = queue.process(backend: backend, budget: 256)
                    healthy = check(result, queue: queue.index, in: active) && healthy
                    if result == .budgetExhausted { progress = true }
                }
                if let queue = active.receive[pair] {
                    let result = queue.process(backend: backend, budget: 256)
                    healthy = check(result, queue: queue.index, in: active) && healthy
                    if result == .budgetExhausted { progress = true }
                }
            }
        }
        if MemoryMapping.faultsInProcess != 0 && active.memory.faults > 0 && !needsReset {
            // The frontend took guest memory away: every ring stops until the device is reset.
            let indices = active.receive.compactMap { $0?.index } + active.transmit.compactMap { $0?.index } + [active.control?.index].compactMap { $0 }
            for index in indices { markBroken(queue: index, .guestMemoryLost, error: active.errors[index]) }
            healthy = false
        }
        return healthy
    }

    /// The most passes over every queue one `poll()` makes.
    public static let pollRounds = 64

    private func countKick(queue index: Int, controlIndex: Int) {
        if index == controlIndex {
            controlCounters.countKick()
        } else if index / 2 < queuePairCounters.count {
            let counters = queuePairCounters[index / 2]
            (index % 2 == 0 ? counters.receive : counters.transmit).countKick()
        }
    }

    private func check(_ result: QueuePassResult, queue: Int, in active: ActiveQueues) -> Bool {
        guard case .broken(let fault) = result else { return true }
        markBroken(queue: queue, fault, error: active.configurations[queue]?.error)
        return false
    }

    /// DEVICE_NEEDS_RESET for a ring the guest broke: signals the ring's error eventfd, if it has one.
    func markBroken(queue: Int, _ fault: QueueFault, error: EventFD?) {
        state.withLock { $0.needsReset = true }
        try? error?.signal()
        logger.error("guest broke a virtqueue; the device needs a reset", metadata: ["queue": "\(queue)", "fault": "\(fault)"])
    }

    /// Executes one control command and applies its effect.
    func executeControl(_ command: [UInt8]) -> ControlAck {
        guard let negotiated = effectiveFeatures else { return .error }
        var effect = ControlEffect.none
        let ack = state.withLock { state -> ControlAck in
            var control = state.control
            let (ack, change) = control.execute(command, negotiated: negotiated, maxQueuePairs: configuration.queuePairs)
            if ack == .ok {
                state.control = control
                effect = change
            }
            return ack
        }
        guard ack == .ok else { return ack }
        do {
            switch effect {
            case .none:
                break
            case .setQueuePairs(let count):
                try backend.setActiveQueuePairs(count)
            case .setGuestOffloads(let features):
                try backend.setReceiveOffloads(OffloadSet(guestFeatures: features))
            case .setMAC(let address):
                filterCell.update { _, mac in mac = address }
            }
        } catch {
            logger.warning("control command failed in the backend", metadata: ["error": "\(error)"])
            return .error
        }
        let filter = state.withLock { $0.control.filter }
        if effect == .none { filterCell.update { current, _ in current = filter } }
        return .ok
    }
}
