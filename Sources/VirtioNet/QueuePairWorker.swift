#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import GuestMemory
import Logging
import Sys
import Virtqueue

/// One thread per queue pair, asleep in epoll until a kick, the backend or a stop request wakes it.
///
/// It never spins while idle: with no guest receive buffers it stops watching the backend for
/// readability (the kernel queues or drops, and counts) until the guest kicks the receive queue; with
/// the backend full it waits for writability before transmitting again.
final class QueuePairWorker: @unchecked Sendable {
    let pair: Int
    private let receive: (any ReceiveEngine)?
    private let transmit: (any FrameEngine)?
    private let control: (any ControlEngine)?
    private let receiveKick: EventFD?
    private let transmitKick: EventFD?
    private let controlKick: EventFD?
    private let counters: QueuePairCounters
    private let controlCounters: QueueCounters
    private let backend: any PacketBackend
    private let memory: GuestMemory
    private let announcements: Announcements?
    private let onBroken: @Sendable (Int, QueueFault) -> Void
    private let logger: Logger
    private let stopSignal: EventFD
    private let epoll: Epoll
    private var thread: WorkerThread?

    private enum Token: UInt64 {
        case stop, transmitKick, receiveKick, backend, controlKick, announce
    }
    /// Frames per queue per wake-up before the other direction gets its turn.
    static let budget = 256

    init(pair: Int, receive: (any ReceiveEngine)?, transmit: (any FrameEngine)?, control: (any ControlEngine)?,
         receiveKick: EventFD?, transmitKick: EventFD?, controlKick: EventFD?,
         counters: QueuePairCounters, controlCounters: QueueCounters, announcements: Announcements?,
         memory: GuestMemory, backend: any PacketBackend,
         onBroken: @escaping @Sendable (Int, QueueFault) -> Void, logger: Logger) throws(SystemError) {
        self.pair = pair
        self.receive = receive
        self.transmit = transmit
        self.control = control
        self.receiveKick = receiveKick
        self.transmitKick = transmitKick
        self.controlKick = controlKick
        self.counters = counters
        self.controlCounters = controlCounters
        self.backend = backend
        self.memory = memory
        self.announcements = announcements
        self.onBroken = onBroken
        self.logger = logger
        stopSignal = try EventFD()
        epoll = try Epoll()
        try epoll.add(fd: stopSignal.rawValue, events: .readable, token: Token.stop.rawValue)
        // Kicks are edge-triggered: every write to a kick eventfd wakes the worker once, whatever is
        // left in its counter (a semaphore eventfd gives back one unit per read and would otherwise
        // stay readable for ever). Each wake-up processes the whole ring, so no kick is lost.
        let kickEvents: Epoll.Events = [.readable, .edgeTriggered]
        if let transmitKick { try epoll.add(fd: transmitKick.rawValue, events: kickEvents, token: Token.transmitKick.rawValue) }
        if let receiveKick { try epoll.add(fd: receiveKick.rawValue, events: kickEvents, token: Token.receiveKick.rawValue) }
        if let controlKick { try epoll.add(fd: controlKick.rawValue, events: kickEvents, token: Token.controlKick.rawValue) }
        if let announcements { try epoll.add(fd: announcements.signal.rawValue, events: .readable, token: Token.announce.rawValue) }
        if receive != nil || transmit != nil {
            try epoll.add(fd: backend.descriptor(queue: pair), events: receive != nil ? .readable : [], token: Token.backend.rawValue)
        }
    }

    func start() throws(SystemError) {
        thread = try WorkerThread(name: "vnet-qp\(pair)") { [self] in run() }
    }

    /// Asks the thread to finish its current pass and waits for it.
    func stop() {
        try? stopSignal.signal()
        thread?.join()
        thread = nil
    }

    private func run() {
        let events = UnsafeMutableBufferPointer<epoll_event>.allocate(capacity: 8)
        defer { events.deallocate() }
        var transmitPending = transmit != nil
        var receivePending = receive != nil
        var controlPending = control != nil
        var transmitBlocked = false
        var waitingForBuffers = false
        var transmitBroken = false
        var receiveBroken = false
        var controlBroken = false
        var announcePending = false
        var processFaultsSeen: UInt64 = 0
        var memoryLost = false
        var backendInterest: Epoll.Events = receive != nil ? .readable : []
        let backendFD = backend.descriptor(queue: pair)

        while true {
            let busy = transmitPending || receivePending || controlPending
            let count: Int
            do {
                count = try epoll.wait(into: events, timeoutMilliseconds: busy ? 0 : -1)
            } catch {
                logger.critical("queue worker cannot wait for events; it stops", metadata: ["pair": "\(pair)", "error": "\(error)"])
                return
            }
            for event in events.prefix(count) {
                switch Token(rawValue: event.data.u64) {
                case .stop:
                    return
                case .transmitKick:
                    if (try? transmitKick?.drain()) != nil { counters.transmit.countKick() }
                    transmitPending = true
                case .receiveKick:
                    if (try? receiveKick?.drain()) != nil { counters.receive.countKick() }
                    if waitingForBuffers {
                        waitingForBuffers = false
                        receive?.disableNotifications()
                    }
                    receivePending = true
                case .controlKick:
                    if (try? controlKick?.drain()) != nil { controlCounters.countKick() }
                    controlPending = true
                case .backend:
                    let ready = Epoll.Events(rawValue: event.events)
                    if ready.contains(.readable) { receivePending = true }
                    if ready.contains(.writable) {
                        transmitBlocked = false
                        transmitPending = true
                    }
                    if !ready.isDisjoint(with: [.error, .hangUp]) && ready.isDisjoint(with: [.readable, .writable]) {
                        // Nothing to read or write will come: stop watching instead of spinning.
                        logger.error("backend reported an error; the queue pair stops using it", metadata: ["pair": "\(pair)"])
                        try? epoll.remove(fd: backendFD)
                        backendInterest = []
                        transmitBroken = true
                        receiveBroken = true
                    }
                case .announce:
                    announcePending = true
                case nil:
                    break
                }
            }

            if announcePending, let announcements, !transmitBlocked, !transmitBroken {
                // Before the guest's frames, as QEMU sends its announcement ahead of traffic.
                announcePending = false
                if !announcements.send(through: backend, queue: pair) {
                    announcePending = true
                    transmitBlocked = true
                }
            }

            if controlPending, let control, !controlBroken {
                controlPending = false
                control.disableNotifications()
                passes: while true {
                    switch control.process(budget: Self.budget) {
                    case .idle:
                        guard (try? control.enableNotifications()) == true else { break passes }
                    case .budgetExhausted:
                        controlPending = true
                        break passes
                    case .broken(let fault):
                        controlBroken = true
                        onBroken(control.index, fault)
                        break passes
                    case .blocked:
                        break passes
                    }
                }
            }

            if transmitPending, let transmit, !transmitBlocked, !transmitBroken {
                transmitPending = false
                transmit.disableNotifications()
                passes: while true {
                    switch transmit.process(backend: backend, budget: Self.budget) {
                    case .idle:
                        // Ask for kicks again; buffers that raced in are ours to handle now.
                        guard (try? transmit.enableNotifications()) == true else { break passes }
                    case .blocked:
                        transmitBlocked = true
                        break passes
                    case .budgetExhausted:
                        transmitPending = true
                        break passes
                    case .broken(let fault):
                        transmitBroken = true
                        onBroken(transmit.index, fault)
                        break passes
                    }
                }
            }

            if receivePending, let receive, !waitingForBuffers, !receiveBroken {
                receivePending = false
                switch receive.process(backend: backend, budget: Self.budget) {
                case .idle:
                    break  // the backend is empty; epoll says when it is not
                case .blocked:
                    // No room in the guest: wait for its kick, unless buffers arrived meanwhile.
                    if (try? receive.enableNotifications()) == true {
                        receivePending = true
                    } else {
                        waitingForBuffers = true
                    }
                case .budgetExhausted:
                    receivePending = true
                case .broken(let fault):
                    receiveBroken = true
                    onBroken(receive.index, fault)
                }
            }

            // One load per pass: did any guarded mapping of the process fault since we last looked?
            let faults = MemoryMapping.faultsInProcess
            if faults != processFaultsSeen {
                processFaultsSeen = faults
                if !memoryLost && memory.faults > 0 {
                    memoryLost = true
                    for index in [receive?.index, transmit?.index, control?.index].compactMap({ $0 }) {
                        onBroken(index, .guestMemoryLost)
                    }
                    receiveBroken = true
                    transmitBroken = true
                    controlBroken = true
                }
            }

            var wanted: Epoll.Events = []
            if receive != nil && !waitingForBuffers && !receiveBroken { wanted.insert(.readable) }
            if transmitBlocked && !transmitBroken { wanted.insert(.writable) }
            if wanted != backendInterest && (receive != nil || transmit != nil) {
                do {
                    try epoll.modify(fd: backendFD, events: wanted, token: Token.backend.rawValue)
                    backendInterest = wanted
                } catch {
                    logger.error("cannot change what the worker waits for", metadata: ["pair": "\(pair)", "error": "\(error)"])
                }
            }
        }
    }
}
