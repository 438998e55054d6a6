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
    /// Where to resume (0 for a fresh queue; GET_VRING_BASE's answer when restoring).
    public var nextAvailableIndex: UInt16
    /// Written by the driver when it adds buffers.
    public var kick: EventFD?
    /// Written by the device to interrupt the driver.
    public var call: EventFD?
    /// Written by the device when the guest breaks this ring (vhost-user SET_VRING_ERR).
    public var error: EventFD?

    public init(index: Int, size: Int, rings: RingAddresses, nextAvailableIndex: UInt16 = 0, kick: EventFD? = nil,
                call: EventFD? = nil, error: EventFD? = nil) {
        self.error = error
        self.index = index
        self.size = size
        self.rings = rings
        self.nextAvailableIndex = nextAvailableIndex
        self.kick = kick
        self.call = call
    }
}

/// Where a queue stopped, to resume it later (vhost-user GET_VRING_BASE, save/restore).
public struct QueueState: Equatable, Sendable {
    public var index: Int
    public var nextAvailableIndex: UInt16

    public init(index: Int, nextAvailableIndex: UInt16) {
        self.index = index
        self.nextAvailableIndex = nextAvailableIndex
    }
}

/// The counters of one queue pair, kept across resets for metrics.
public final class QueuePairCounters: Sendable {
    public let receive = QueueCounters()
    public let transmit = QueueCounters()
}

/// The queues of an activated device. Engines are driven by one thread at a time.
final class ActiveQueues: @unchecked Sendable {
    let memory: GuestMemory
    var receive: [ReceiveQueue?]
    var transmit: [TransmitQueue?]
    var control: ControlQueueEngine?
    var kicks: [Int: EventFD] = [:]
    var errors: [Int: EventFD] = [:]
    var workers: [QueuePairWorker] = []
    let controlIndex: Int
    /// Frames to announce the device with, sent by whoever owns queue pair 0 (its worker, or poll()).
    let announcements: Announcements

    init(memory: GuestMemory, pairs: Int, controlIndex: Int, announcements: Announcements) {
        self.memory = memory
        self.controlIndex = controlIndex
        self.announcements = announcements
        receive = Array(repeating: nil, count: pairs)
        transmit = Array(repeating: nil, count: pairs)
    }
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
    /// `.workerThreads`, every queue needs a kick eventfd). Queues not given stay unused.
    public func activate(memory: GuestMemory, queues: [QueueConfiguration], drive: DriveMode = .workerThreads) throws(NetDeviceError) {
        guard let features = effectiveFeatures else { throw .invalidState("activate before features were acknowledged") }
        let controlIndex = features.contains(.ctrlVQ) ? controlQueueIndex(features: features) : -1
        let pairs = configuration.queuePairs
        let ringFeatures = RingFeatures(
            eventIndex: features.contains(.eventIndex), indirectDescriptors: features.contains(.indirectDescriptors)
        )
        let announcements: Announcements
        do { announcements = try Announcements() } catch { throw .backend("cannot create the announcement eventfd: \(error)") }
        let active = ActiveQueues(memory: memory, pairs: pairs, controlIndex: controlIndex, announcements: announcements)
        let mtu = self.mtu
        var seen = Set<Int>()
        for queue in queues {
            guard queue.index >= 0, queue.index < 2 * pairs || queue.index == controlIndex else {
                throw .invalidQueue(index: queue.index, "no such queue")
            }
            guard seen.insert(queue.index).inserted else { throw .invalidQueue(index: queue.index, "given twice") }
            guard queue.size <= configuration.maximumQueueSize else {
                throw .invalidQueue(index: queue.index, "size \(queue.size) exceeds the maximum \(configuration.maximumQueueSize)")
            }
            let ring: SplitQueue
            do {
                ring = try SplitQueue(memory: memory, size: queue.size, rings: queue.rings, features: ringFeatures,
                                      nextAvailableIndex: queue.nextAvailableIndex)
            } catch {
                throw .queueSetup(index: queue.index, error)
            }
            let queueLogger = logger
            if queue.index == controlIndex {
                active.control = ControlQueueEngine(
                    index: queue.index, ring: ring, call: queue.call, counters: controlCounters, logger: queueLogger,
                    execute: { [weak self] command in self?.executeControl(command) ?? .error }
                )
            } else if queue.index % 2 == 0 {
                let pair = queue.index / 2
                active.receive[pair] = ReceiveQueue(
                    index: queue.index, backendQueue: pair, ring: ring, call: queue.call,
                    counters: queuePairCounters[pair].receive, features: features, mtu: mtu,
                    filter: filterCell, logger: queueLogger
                )
            } else {
                let pair = queue.index / 2
                active.transmit[pair] = TransmitQueue(
                    index: queue.index, backendQueue: pair, ring: ring, call: queue.call,
                    counters: queuePairCounters[pair].transmit, features: features, mtu: mtu,
                    logger: queueLogger
                )
            }
            if let error = queue.error { active.errors[queue.index] = error }
            if let kick = queue.kick {
                active.kicks[queue.index] = kick
            } else if drive == .workerThreads {
                throw .invalidQueue(index: queue.index, "a kick eventfd is needed for worker threads")
            }
        }
        try state.withLock { (state) throws(NetDeviceError) in
            guard state.active == nil else { throw .invalidState("already active") }
            state.active = active
        }
        if drive == .workerThreads {
            do {
                try startWorkers(active)
            } catch {
                reset()
                throw .backend("cannot start queue workers: \(error)")
            }
        }
    }

    private func startWorkers(_ active: ActiveQueues) throws(SystemError) {
        for pair in 0..<configuration.queuePairs {
            let control = pair == 0 ? active.control : nil
            guard active.receive[pair] != nil || active.transmit[pair] != nil || control != nil else { continue }
            let worker = try QueuePairWorker(
                pair: pair, receive: active.receive[pair], transmit: active.transmit[pair], control: control,
                receiveKick: active.kicks[2 * pair], transmitKick: active.kicks[2 * pair + 1],
                controlKick: control.flatMap { active.kicks[$0.index] },
                counters: queuePairCounters[pair], controlCounters: controlCounters,
                announcements: pair == 0 ? active.announcements : nil, memory: active.memory, backend: backend,
                onBroken: { [weak self] queue, fault in self?.markBroken(queue: queue, fault) },
                logger: logger
            )
            active.workers.append(worker)
            workerCount.add(1, ordering: .relaxed)
            try worker.start()
        }
    }

    deinit {
        if let active = state.withLock({ $0.active }) {
            for worker in active.workers { worker.stop() }
        }
    }

    /// Stops the device and returns where each queue stopped. Features must be acknowledged again.
    @discardableResult
    public func reset() -> [QueueState] {
        let active = state.withLock { state -> ActiveQueues? in
            let active = state.active
            state.active = nil
            state.negotiated = nil
            state.needsReset = false
            state.control = ControlState()
            return active
        }
        guard let active else { return [] }
        for worker in active.workers { worker.stop() }
        workerCount.subtract(active.workers.count, ordering: .relaxed)
        active.workers.removeAll()
        // A worker in the middle of its pass may have found a broken ring meanwhile: that ring
        // belonged to this activation, and this reset is what it asked for.
        state.withLock { $0.needsReset = false }
        var states: [QueueState] = []
        for queue in active.receive.compactMap({ $0 }) {
            queue.returnCachedChains()
            states.append(QueueState(index: queue.index, nextAvailableIndex: queue.nextAvailableIndex))
        }
        for queue in active.transmit.compactMap({ $0 }) {
            states.append(QueueState(index: queue.index, nextAvailableIndex: queue.nextAvailableIndex))
        }
        if let control = active.control {
            states.append(QueueState(index: control.index, nextAvailableIndex: control.nextAvailableIndex))
        }
        return states.sorted { $0.index < $1.index }
    }

    /// Announces the guest at `mac` out of the backend (a RARP request, as after a live migration),
    /// so that bridges and switches learn its new port. The frame goes out on queue pair 0 from the
    /// thread that owns that queue: its worker, the next `poll()` in manual mode, or this thread when
    /// the device is not running.
    public func announce(mac: MACAddress) {
        let frame = Announcements.reverseARP(for: mac)
        state.withLock { state in
            if let active = state.active, active.receive[0] != nil || active.transmit[0] != nil || active.control != nil {
                active.announcements.post(frame)
            } else {
                // No worker owns queue 0, and activation waits for this lock.
                let announcements = try? Announcements()
                announcements?.post(frame)
                announcements?.send(through: backend, queue: 0)
            }
        }
    }

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
        guard let active = state.withLock({ $0.active }), active.workers.isEmpty else { return !needsReset }
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
                healthy = check(result, queue: control.index) && healthy
                if result == .budgetExhausted { progress = true }
            }
            for pair in 0..<configuration.queuePairs {
                if let queue = active.transmit[pair] {
                    let result = queue.process(backend: backend, budget: 256)
                    healthy = check(result, queue: queue.index) && healthy
                    if result == .budgetExhausted { progress = true }
                }
                if let queue = active.receive[pair] {
                    let result = queue.process(backend: backend, budget: 256)
                    healthy = check(result, queue: queue.index) && healthy
                    if result == .budgetExhausted { progress = true }
                }
            }
        }
        if MemoryMapping.faultsInProcess != 0 && active.memory.faults > 0 && !needsReset {
            // The frontend took guest memory away: every ring stops until the device is reset.
            let indices = active.receive.compactMap { $0?.index } + active.transmit.compactMap { $0?.index } + [active.control?.index].compactMap { $0 }
            for index in indices { markBroken(queue: index, .guestMemoryLost) }
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

    private func check(_ result: QueuePassResult, queue: Int) -> Bool {
        guard case .broken(let fault) = result else { return true }
        markBroken(queue: queue, fault)
        return false
    }

    func markBroken(queue: Int, _ fault: QueueFault) {
        let error = state.withLock { state -> EventFD? in
            state.needsReset = true
            return state.active?.errors[queue]
        }
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
