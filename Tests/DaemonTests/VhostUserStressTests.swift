#if canImport(Glibc)
import Glibc
#endif
import Foundation
import GuestMemory
import NetworkTestSupport
import Synchronization
import Sys
import Testing
import VhostUser
import VirtioNet
import VirtioNetTestSupport

/// The stress device's MAC: its service thread is "vhost-57:e5", a name no other test's device uses.
let stressMAC = MACAddress(0x52, 0x54, 0x00, 0x5e, 0x57, 0xe5)

/// The storm, and what it checks.
///
/// A `NetDevice` with two queue pairs on a loopback backend (frames sent on pair N come back on pair
/// N's receive side; `ContractCheckingBackend` also checks that only pair N's worker calls it for queue
/// N) is served by a `VhostUserService` on a unix socket. A simulated frontend negotiates, then one
/// thread per queue pair plays the guest (`GuestPair`): it keeps its RX ring full of 2048-byte
/// buffers, sends tagged frames on its TX ring, injects tagged frames into the backend's queue as a
/// TAP's peer would, and reaps and checks every used entry. Meanwhile the storm thread sends a
/// seeded-random sequence of messages (`StressScenario.Action`) in the order the protocol asks for.
///
/// The guest's model is exact: a chain's head owns its buffer until the chain comes back, so a used
/// entry must name an outstanding head (and then it is not outstanding any more); a TX used entry has
/// length 0; an RX buffer must hold a zero header with num_buffers 1 and a tagged frame that is byte
/// for byte the one sent, never one that was not sent, never twice. A stopped ring has nothing in
/// flight, so GET_VRING_BASE must report exactly the ring's used.idx; the guest resumes from that
/// base (SET_VRING_BASE), and the chains the device had not consumed are consumed after the restart.
/// At RESET_DEVICE the guest threads pause, the outstanding chains must be exactly avail.idx - used.idx
/// of each ring and are abandoned (a TX frame abandoned so must never arrive), and the backend must
/// hold no copy of any ring eventfd. After the storm every ring runs again and the guests drain: each
/// frame whose TX chain came back, and each injected frame, arrived or was counted as a receive drop
/// (a frame the device had read into its bounce buffer when a ring stopped); then 100 more frames each
/// way per pair must all arrive with no drop. At the end, with every ring stopped, the device's frame
/// counters must equal what the guests saw, and after the frontend leaves no worker, service thread,
/// socket, copy of a ring eventfd or memfd, or mapping of guest memory may remain.
@Suite("vhost-user: ring-restarting messages while two queue pairs carry traffic")
struct VhostUserStressTests {
    @Test("""
        A seeded storm of GET/SET_VRING_BASE, SET_MEM_TABLE, ADD/REM_MEM_REG, SET_VRING_ENABLE, SET_FEATURES, \
        new eventfds and RESET_DEVICE while both queue pairs carry traffic both ways: every used entry and every frame is \
        accounted for, traffic flows after it, and nothing of the connection is left behind
        """)
    func storm() async throws {
        let settings = try StressSettings.fromEnvironment()
        print("vhost-user stress: \(settings) (\(StressSettings.seedVariable) and \(StressSettings.secondsVariable) change them)")
        let outcome = try await runOnThread(named: "stress-storm") { StressScenario(settings: settings).run() }
        print("vhost-user stress: \(settings): \(outcome.summary)")
        #expect(outcome.violations.isEmpty, "vhost-user stress, \(settings):\n\(outcome.violations)")
    }
}

/// Runs `body` on a thread of its own (it blocks for seconds) and returns what it returns.
func runOnThread<T: Sendable>(named name: String, _ body: @escaping @Sendable () -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        do {
            // Not joined: the thread ends right after it resumes the continuation.
            _ = try WorkerThread(name: name) { continuation.resume(returning: body()) }
        } catch {
            continuation.resume(throwing: error)
        }
    }
}

// MARK: Phases and pauses

/// What the guest threads do now, and a pause the storm takes while it resets the guest's rings.
final class StressControl: Sendable {
    enum Phase: Sendable {
        /// Send, inject and receive freely.
        case storm
        /// Send nothing new; receive until every frame arrived or was counted as dropped.
        case drain
        /// Send a fixed number of frames each way; all must arrive.
        case verify
        case stop
    }

    private let state = Mutex<(phase: Phase, pause: Bool, parked: Int)>((.storm, false, 0))

    var phase: Phase { state.withLock { $0.phase } }
    func set(_ phase: Phase) { state.withLock { $0.phase = phase } }

    /// A guest thread's checkpoint between iterations: waits here while a pause is asked for.
    func checkpoint() -> Phase {
        let (phase, pause) = state.withLock { ($0.phase, $0.pause) }
        guard pause else { return phase }
        state.withLock { $0.parked += 1 }
        defer { state.withLock { $0.parked -= 1 } }
        // The storm resumes within seconds; if it never does, the guest stops rather than hang.
        let resumed = eventually(timeout: 300) { !state.withLock { $0.pause } }
        return resumed ? state.withLock { $0.phase } : .stop
    }

    /// Asks the guest threads to pause; true once all `count` are parked.
    func pauseGuests(_ count: Int, timeout: Double = 60) -> Bool {
        state.withLock { $0.pause = true }
        return eventually(timeout: timeout) { state.withLock { $0.parked == count } }
    }

    func resumeGuests() { state.withLock { $0.pause = false } }
}

// MARK: The guest of one queue pair

/// What the guest of one queue pair knows about its frames.
struct PairLedger {
    enum Transmit: UInt8 {
        case posted, completed
        /// The chain was still outstanding when the device was reset: the frame was never sent.
        case abandoned
    }

    /// By sequence number: each TX frame's state and whether it arrived back.
    var transmit: [Transmit] = []
    var transmitReceived: [Bool] = []
    /// By sequence number: whether each frame injected on the host side arrived.
    var hostReceived: [Bool] = []
    var completed = 0
    var abandoned = 0
    var receivedGuest = 0
    var receivedHost = 0
    var receivedRARP = 0
    /// TX frames completed and host frames injected that have not arrived (yet).
    var unreceivedCompleted = 0
    var unreceivedHost = 0
    var lost: Int { unreceivedCompleted + unreceivedHost }
}

/// Plays the guest driver of one queue pair on a thread of its own: posts receive buffers, sends
/// frames, injects frames on the host side of the backend, reaps and checks every used entry.
///
/// Owned by its thread while it runs, by the storm while the guests are paused (the pause's mutex
/// orders the two), and by the scenario after the thread is joined.
final class GuestPair: @unchecked Sendable {
    struct Status: Sendable {
        var drained = false
        var verified = false
        var progress = 0
        var summary = ""
    }

    static let verifyFrames = 100
    /// Frames the guest lets wait in the backend before it sends more (the loopback holds 4096).
    static let backendBacklog = 384

    let pair: Int
    let receive: GuestRing
    let transmit: GuestRing
    var ledger = PairLedger()
    /// Whether chains may use indirect tables: what was negotiated (set while the guests are paused).
    var useIndirect: Bool
    let status = Mutex(Status())
    private let world: StressWorld
    private var random: SplitMix64
    private let scratch = UnsafeMutableRawPointer.allocate(byteCount: GuestRing.bufferSize, alignment: 16)
    private var verifyArmed = false
    private var verifyTransmitLeft = 0, verifyHostLeft = 0
    private var verifyTransmitFrom = 0, verifyHostFrom = 0
    private var progress = 0

    init(pair: Int, world: StressWorld, useIndirect: Bool) throws {
        self.pair = pair
        self.world = world
        self.useIndirect = useIndirect
        receive = try GuestRing(index: 2 * pair, memory: world.memory)
        transmit = try GuestRing(index: 2 * pair + 1, memory: world.memory)
        random = SplitMix64(seed: world.settings.seed ^ UInt64(pair + 1) &* 0x1000_0000_01b3)
    }

    deinit { scratch.deallocate() }

    func run() {
        while true {
            let phase = world.control.checkpoint()
            if phase == .stop { return }
            if phase == .verify && !verifyArmed {
                verifyArmed = true
                verifyTransmitLeft = Self.verifyFrames
                verifyHostLeft = Self.verifyFrames
                verifyTransmitFrom = ledger.transmit.count
                verifyHostFrom = ledger.hostReceived.count
            }
            let progressed = iteration(phase)
            publishStatus(phase)
            if !progressed { waitForInterrupt() }
        }
    }

    private func iteration(_ phase: StressControl.Phase) -> Bool {
        var progressed = reap() > 0
        progressed = postReceiveBuffers() > 0 || progressed
        guard phase == .storm || phase == .verify,
              world.backend.loopback.pendingFrames(queue: pair) < Self.backendBacklog else { return progressed }
        var sendLimit = Int.random(in: 1...16, using: &random)
        var injectLimit = Int.random(in: 0...8, using: &random)
        if phase == .verify {
            sendLimit = min(sendLimit, verifyTransmitLeft)
            injectLimit = min(injectLimit, verifyHostLeft)
        }
        let sent = postTransmit(limit: sendLimit)
        let injected = injectHostFrames(limit: injectLimit)
        if phase == .verify {
            verifyTransmitLeft -= sent
            verifyHostLeft -= injected
        }
        return progressed || sent > 0 || injected > 0
    }

    /// Sleeps until one of the pair's call eventfds fires, or 10 ms pass (new buffers or a
    /// restarted ring may need a look without an interrupt; nothing is decided by the timeout).
    private func waitForInterrupt() {
        let calls = [world.eventFDs.call(2 * pair), world.eventFDs.call(2 * pair + 1)]  // kept open while polled
        var entries = calls.map { pollfd(fd: $0.rawValue, events: Int16(POLLIN), revents: 0) }
        _ = poll(&entries, nfds_t(entries.count), 10)
        for call in calls { _ = try? call.drain() }
    }

    private func publishStatus(_ phase: StressControl.Phase) {
        let drops = Int(world.device.queuePairCounters[pair].receive.dropped(.tooLarge))
        let pending = world.backend.loopback.pendingFrames(queue: pair)
        let drained = transmit.outstanding == 0 && pending == 0 && ledger.lost <= drops
        var verified = false
        if phase == .verify && verifyArmed && verifyTransmitLeft == 0 && verifyHostLeft == 0 && transmit.outstanding == 0 {
            verified = ledger.transmitReceived[verifyTransmitFrom...].allSatisfy { $0 } && ledger.hostReceived[verifyHostFrom...].allSatisfy { $0 }
        }
        let summary = "TX outstanding \(transmit.outstanding), backend backlog \(pending), frames not arrived \(ledger.lost), "
            + "RX drops \(drops), verify frames left to send \(verifyTransmitLeft)+\(verifyHostLeft)"
        let progress = self.progress
        status.withLock { status in
            status.drained = drained
            status.verified = verified
            status.progress = progress
            status.summary = summary
        }
    }

    private func pickLayout() -> GuestRing.Layout {
        switch Int.random(in: 0..<10, using: &random) {
        case 0..<5: .single
        case 5..<8: .split
        default: useIndirect ? .indirect : .split
        }
    }

    private func kick(_ ring: GuestRing, since old: UInt16) {
        if ring.needsKick(since: old) { try? world.eventFDs.kick(ring.index).signal() }
    }

    /// Fills every free descriptor of the RX ring with a 2048-byte buffer whose header is stamped
    /// 0xee (a used entry whose header was not written shows).
    func postReceiveBuffers() -> Int {
        let old = receive.availableIndex
        var posted = 0
        while receive.freeDescriptors > 0 {
            var layout = pickLayout()
            if receive.freeDescriptors < GuestRing.descriptorsNeeded(layout) { layout = .single }
            guard let (head, second) = receive.reserve(layout) else { break }
            memset(receive.buffer(head), 0xee, VirtioNetHeader.size)
            receive.commit(head: head, second: second, layout: layout, length: GuestRing.bufferSize, writable: true, token: 0)
            posted += 1
        }
        if posted > 0 {
            receive.publish()
            kick(receive, since: old)
        }
        return posted
    }

    /// Makes up to `limit` tagged frames available on the TX ring, one publication, one kick check.
    func postTransmit(limit: Int) -> Int {
        let old = transmit.availableIndex
        var sent = 0
        while sent < limit {
            let layout = pickLayout()
            guard let (head, second) = transmit.reserve(layout) else { break }
            let sequence = ledger.transmit.count
            let buffer = transmit.buffer(head)
            memset(buffer, 0, VirtioNetHeader.size)
            let length = TaggedFrame.write(seed: world.settings.seed, .init(origin: .guest, pair: pair, sequence: sequence),
                                           destination: stressMAC, to: buffer + VirtioNetHeader.size)
            transmit.commit(head: head, second: second, layout: layout, length: VirtioNetHeader.size + length, writable: false, token: sequence)
            ledger.transmit.append(.posted)
            ledger.transmitReceived.append(false)
            sent += 1
        }
        if sent > 0 {
            transmit.publish()
            kick(transmit, since: old)
        }
        return sent
    }

    /// Puts up to `limit` tagged frames into the backend's queue for this pair, as a TAP's peer would.
    private func injectHostFrames(limit: Int) -> Int {
        var injected = 0
        while injected < limit {
            let tag = TaggedFrame.Tag(origin: .host, pair: pair, sequence: ledger.hostReceived.count)
            var bytes = [UInt8](repeating: 0, count: VirtioNetHeader.size + TaggedFrame.length(seed: world.settings.seed, tag))
            bytes.withUnsafeMutableBytes { buffer in
                guard let base = buffer.baseAddress else { return }
                TaggedFrame.write(seed: world.settings.seed, tag, destination: stressMAC, to: base + VirtioNetHeader.size)
            }
            guard world.backend.loopback.inject(queue: pair, frame: bytes) else { break }
            ledger.hostReceived.append(false)
            ledger.unreceivedHost += 1
            injected += 1
        }
        return injected
    }

    /// Takes every used entry of both rings and checks it. Returns how many there were.
    @discardableResult
    func reap() -> Int {
        let transmitted = transmit.reap { used in
            switch used {
            case .stray(let head, let length):
                world.violations.record("TX ring \(transmit.index): a used entry names head \(head) (length \(length)), which was not outstanding")
            case .chain(let head, let length, let sequence):
                if length != 0 { world.violations.record("TX ring \(transmit.index): head \(head) used with length \(length); a TX chain has no writable bytes") }
                ledger.transmit[sequence] = .completed
                ledger.completed += 1
                if !ledger.transmitReceived[sequence] { ledger.unreceivedCompleted += 1 }
            }
        }
        let received = receive.reap { used in
            switch used {
            case .stray(let head, let length):
                world.violations.record("RX ring \(receive.index): a used entry names head \(head) (length \(length)), which was not outstanding")
            case .chain(let head, let length, _):
                check(head: head, length: Int(length))
            }
        }
        progress += transmitted + received
        return transmitted + received
    }

    private func check(head: UInt16, length: Int) {
        let ring = receive.index
        guard length >= VirtioNetHeader.size + 14, length <= GuestRing.bufferSize else {
            world.violations.record("RX ring \(ring): head \(head) used with length \(length)")
            return
        }
        let buffer = receive.buffer(head)
        let header = (0..<VirtioNetHeader.size).map { buffer.load(fromByteOffset: $0, as: UInt8.self) }
        if header[0..<10].contains(where: { $0 != 0 }) || header[10] != 1 || header[11] != 0 {
            world.violations.record("RX ring \(ring): a header of \(header) (zeros and num_buffers 1 expected; 0xee: not written)")
        }
        switch TaggedFrame.parse(seed: world.settings.seed, buffer + VirtioNetHeader.size, length: length - VirtioNetHeader.size,
                                 destination: stressMAC, scratch: scratch) {
        case .failure(let error):
            world.violations.record("RX ring \(ring): \(error)")
        case .success(.rarp):
            if pair == 0 { ledger.receivedRARP += 1 } else { world.violations.record("RX ring \(ring): a RARP frame (SEND_RARP goes to queue 0)") }
        case .success(.tagged(let tag)):
            arrived(tag)
        }
    }

    private func arrived(_ tag: TaggedFrame.Tag) {
        guard tag.pair == pair else {
            world.violations.record("\(tag) arrived on pair \(pair)")
            return
        }
        switch tag.origin {
        case .guest:
            guard tag.sequence < ledger.transmit.count else {
                world.violations.record("\(tag) arrived but was never made available")
                return
            }
            if ledger.transmit[tag.sequence] == .abandoned {
                world.violations.record("\(tag) arrived although its TX chain was unconsumed when the device was reset")
            }
            guard !ledger.transmitReceived[tag.sequence] else {
                world.violations.record("\(tag) arrived twice")
                return
            }
            ledger.transmitReceived[tag.sequence] = true
            ledger.receivedGuest += 1
            if ledger.transmit[tag.sequence] == .completed { ledger.unreceivedCompleted -= 1 }
        case .host:
            guard tag.sequence < ledger.hostReceived.count else {
                world.violations.record("\(tag) arrived but was never injected")
                return
            }
            guard !ledger.hostReceived[tag.sequence] else {
                world.violations.record("\(tag) arrived twice")
                return
            }
            ledger.hostReceived[tag.sequence] = true
            ledger.receivedHost += 1
            ledger.unreceivedHost -= 1
        }
    }

    /// After a device reset: the chains still outstanding were never consumed. Their TX frames are
    /// marked abandoned (none may arrive), and both rings are laid out afresh.
    func abandonAndReset() {
        for sequence in transmit.outstandingTokens {
            ledger.transmit[sequence] = .abandoned
            ledger.abandoned += 1
            if ledger.transmitReceived[sequence] {
                world.violations.record("\(TaggedFrame.Tag(origin: .guest, pair: pair, sequence: sequence)) arrived, but its TX chain was never used")
            }
        }
        receive.reset()
        transmit.reset()
    }
}

// MARK: The scenario

/// What the guest threads and the storm share; fixed for the whole run.
final class StressWorld: Sendable {
    let settings: StressSettings
    let violations: Violations
    let memory: StressMemory
    let backend: ContractCheckingBackend
    let device: NetDevice
    let eventFDs: RingEventFDs
    let control = StressControl()

    init(settings: StressSettings, violations: Violations) throws {
        self.settings = settings
        self.violations = violations
        memory = try StressMemory()
        backend = try ContractCheckingBackend(queuePairs: 2, violations: violations)
        device = try NetDevice(configuration: NetConfiguration(mac: stressMAC, mtu: 1500, queuePairs: 2), backend: backend, logger: quietLogger)
        eventFDs = try RingEventFDs(rings: 4)
    }
}

struct StressOutcome: Sendable {
    var violations: String
    var summary: String
}

/// The storm: a frontend that sends a seeded-random sequence of ring-restarting messages, in the
/// order the protocol asks for, while two guest threads carry traffic; then the checks.
final class StressScenario: @unchecked Sendable {
    /// The frontend's view of one ring.
    struct Ring {
        /// Set by GET_VRING_BASE: the ring is stopped until SET_VRING_BASE and SET_VRING_KICK.
        var stoppedAt: UInt16?
        var enabled = true
    }

    enum Action: String, CaseIterable {
        case stopRing, restartRing, disableRing, enableRing, newCall, newKick, newError
        case memoryTable, addExtraRegion, removeExtraRegion, addRegionAgain
        case sameFeatures, stopAllAndRestart, resetDevice
        case rarp, status, config, mtu

        var weight: Int {
            switch self {
            case .stopRing: 12
            case .restartRing: 16
            case .disableRing: 8
            case .enableRing: 12
            case .newCall: 8
            case .newKick, .newError: 4
            case .memoryTable: 5
            case .addExtraRegion, .removeExtraRegion: 4
            case .addRegionAgain: 2
            case .sameFeatures: 3
            case .stopAllAndRestart: 4
            case .resetDevice: 3
            case .rarp: 4
            case .status, .config, .mtu: 2
            }
        }
    }

    let settings: StressSettings
    let violations = Violations()
    private var random: SplitMix64
    private var rings = Array(repeating: Ring(), count: 4)
    private var extraMapped = false
    private var offered: UInt64 = 0
    private var features: UInt64 = 0
    private var actions: [Action: Int] = [:]
    private var actionTime: [Action: Double] = [:]
    private var resets = 0

    init(settings: StressSettings) {
        self.settings = settings
        random = SplitMix64(seed: settings.seed)
    }

    /// Everything, start to end; never throws: what fails is a violation in the outcome.
    func run() -> StressOutcome {
        var summary = ""
        do {
            summary = try runScenario()
        } catch {
            violations.record("the scenario stopped: \(error)")
        }
        return StressOutcome(violations: violations.report, summary: summary)
    }

    private func runScenario() throws -> String {
        let world = try StressWorld(settings: settings, violations: violations)
        let directory = try TemporaryDirectory("vu-stress")
        defer { directory.remove() }
        let path = directory.path + "/vhost.sock"
        // Released after it stops (its listening socket closes with it), so the end can check.
        var service: VhostUserService? = try VhostUserService(path: path, mode: .server, device: world.device, logger: quietLogger)
        try service?.start()
        defer { service?.stop() }
        let frontend = try Frontend.connect(path: path)
        frontend.timeout = 60
        defer { frontend.close() }

        // QEMU's order: features, protocol features, owner, queue count, memory, rings, enable.
        // Split rings: this guest's driver lays out split rings only.
        offered = try frontend.getFeatures() & ~VirtioNetFeatures.ringPacked.rawValue
        features = offered
        try frontend.setFeatures(features)
        try frontend.setProtocolFeatures(try frontend.getProtocolFeatures() & Frontend.defaultProtocolFeatures)
        try frontend.setOwner()
        guard try frontend.getQueueNum() == 2 else { throw StressError("GET_QUEUE_NUM is not 2") }
        let pairs = try (0..<2).map { try GuestPair(pair: $0, world: world, useIndirect: features & VirtioNetFeatures.indirectDescriptors.rawValue != 0) }
        try frontend.setMemTable(world.memory.regions, fds: world.memory.fds)
        for ring in 0..<4 { try startRing(ring, base: 0, full: true, newCall: false, frontend: frontend, world: world, pairs: pairs) }
        for ring in 0..<4 { try frontend.setVringEnable(UInt32(ring), true) }

        let threads = try pairs.map { pair in try WorkerThread(name: "stress-guest\(pair.pair)") { pair.run() } }
        var joined = false
        func joinGuests() {
            guard !joined else { return }
            joined = true
            world.control.resumeGuests()
            world.control.set(.stop)
            for thread in threads { thread.join() }
        }
        defer { joinGuests() }

        // The storm.
        let started = monotonicNow()
        let end = started + settings.seconds
        var stormError: Error?
        while monotonicNow() < end {
            let action = pickAction()
            let actionStart = monotonicNow()
            do {
                try perform(action, frontend: frontend, world: world, pairs: pairs)
            } catch {
                stormError = error
                violations.record("\(action.rawValue): \(error)")
                break
            }
            actions[action, default: 0] += 1
            actionTime[action, default: 0] += monotonicNow() - actionStart
            if chance(2, in: 3) { pace(pairs) }
        }
        let stormSeconds = monotonicNow() - started
        if let stormError { throw StressError("the storm ended early: \(stormError)") }

        // Every ring running again, then: drain, then a fixed batch that must arrive whole.
        for ring in 0..<4 {
            if rings[ring].stoppedAt != nil { try restartRing(ring, frontend: frontend, world: world, pairs: pairs) }
            if !rings[ring].enabled {
                try frontend.setVringEnable(UInt32(ring), true)
                rings[ring].enabled = true
            }
        }
        world.control.set(.drain)
        if !eventually(timeout: 60, { pairs.allSatisfy { $0.status.withLock { $0.drained } } }) {
            for pair in pairs { violations.record("pair \(pair.pair) did not drain after the storm: \(pair.status.withLock { $0.summary })") }
        }
        let dropsBefore = dropCounters(world.device)
        world.control.set(.verify)
        if !eventually(timeout: 60, { pairs.allSatisfy { $0.status.withLock { $0.verified } } }) {
            for pair in pairs { violations.record("pair \(pair.pair): the \(GuestPair.verifyFrames)+\(GuestPair.verifyFrames) frames after the storm did not all arrive: \(pair.status.withLock { $0.summary })") }
        }
        if dropCounters(world.device) != dropsBefore {
            violations.record("frames were dropped after the storm: \(dropsBefore) -> \(dropCounters(world.device))")
        }
        joinGuests()

        // Quiet now: stop every ring and account for everything.
        for ring in 0..<4 { try stopRing(ring, frontend: frontend, world: world, pairs: pairs) }
        for pair in pairs {
            pair.reap()
            if let base = rings[pair.transmit.index].stoppedAt, base != pair.transmit.availableIndex {
                violations.record("TX ring \(pair.transmit.index) stopped at \(base) with avail.idx \(pair.transmit.availableIndex): frames were left unsent")
            }
            if pair.transmit.outstanding != 0 { violations.record("TX ring \(pair.transmit.index): \(pair.transmit.outstanding) chains never came back") }
            account(pair, world: world)
        }
        let status = try frontend.getStatus()
        if status & 0x40 != 0 || world.device.needsReset { violations.record("the device needs a reset (GET_STATUS 0x\(String(status, radix: 16))): a ring broke") }
        let summary = summarize(pairs, world: world, seconds: stormSeconds)

        // Disconnect; everything the connection held must go.
        let socketInodes = ProcessView.unixSocketInodes(path: path)
        frontend.close()
        if !eventually(timeout: 20, { !world.device.isActive }) { violations.record("the device still runs after the frontend left") }
        service?.stop()
        service = nil
        var leftovers: [String] = []
        let clean = eventually(timeout: 20) {
            leftovers = self.leftovers(world: world, socketInodes: socketInodes)
            return leftovers.isEmpty
        }
        if !clean { violations.record("after the disconnect: " + leftovers.joined(separator: "; ")) }
        return summary
    }

    // MARK: Actions

    private func pickAction() -> Action {
        let stopped = rings.filter { $0.stoppedAt != nil }.count
        let inactive = rings.filter { $0.stoppedAt != nil || !$0.enabled }.count
        let possible = Action.allCases.filter { action in
            switch action {
            case .stopRing: inactive < 2 && stopped < 4
            case .restartRing: stopped > 0
            case .disableRing: inactive < 2 && rings.contains { $0.enabled }
            case .enableRing: rings.contains { !$0.enabled }
            case .newKick: rings.contains { $0.stoppedAt == nil }
            case .addExtraRegion: !extraMapped
            case .removeExtraRegion: extraMapped
            default: true
            }
        }
        let total = possible.reduce(0) { $0 + $1.weight }
        var pick = Int.random(in: 0..<total, using: &random)
        for action in possible {
            if pick < action.weight { return action }
            pick -= action.weight
        }
        return .status
    }

    private func randomRing(where condition: (Ring) -> Bool) -> Int? {
        let candidates = (0..<4).filter { condition(rings[$0]) }
        guard !candidates.isEmpty else { return nil }
        return candidates[Int.random(in: 0..<candidates.count, using: &random)]
    }

    private func chance(_ numerator: Int, in denominator: Int) -> Bool { Int.random(in: 0..<denominator, using: &random) < numerator }

    private func perform(_ action: Action, frontend: Frontend, world: StressWorld, pairs: [GuestPair]) throws {
        switch action {
        case .stopRing:
            if let ring = randomRing(where: { $0.stoppedAt == nil }) { try stopRing(ring, frontend: frontend, world: world, pairs: pairs) }
        case .restartRing:
            if let ring = randomRing(where: { $0.stoppedAt != nil }) { try restartRing(ring, frontend: frontend, world: world, pairs: pairs) }
        case .disableRing:
            if let ring = randomRing(where: { $0.enabled }) {
                try frontend.setVringEnable(UInt32(ring), false)
                rings[ring].enabled = false
            }
        case .enableRing:
            if let ring = randomRing(where: { !$0.enabled }) {
                try frontend.setVringEnable(UInt32(ring), true)
                rings[ring].enabled = true
            }
        case .newCall:
            let ring = Int.random(in: 0..<4, using: &random)
            try frontend.setVringCall(UInt32(ring), fd: try world.eventFDs.replaceCall(ring).rawValue)
        case .newKick:
            if let ring = randomRing(where: { $0.stoppedAt == nil }) {
                try frontend.setVringKick(UInt32(ring), fd: try world.eventFDs.replaceKick(ring).rawValue)
            }
        case .newError:
            // SET_VRING_ERR: where the device would signal a ring the guest broke (none here).
            let ring = Int.random(in: 0..<4, using: &random)
            let error = try world.eventFDs.replace(.error, ring)
            try frontend.call(.setVringErr, payload: LE.u64(UInt64(ring)), fds: [error.rawValue])
        case .memoryTable:
            try setMemoryTable(withExtra: chance(1, in: 2), frontend: frontend, world: world)
        case .addExtraRegion:
            try frontend.addMemoryRegion(world.memory.extra, fd: world.memory.extraFD)
            extraMapped = true
        case .removeExtraRegion:
            try frontend.removeMemoryRegion(world.memory.extra)
            extraMapped = false
        case .addRegionAgain:
            // QEMU 7.2 sends a mapped region again: nothing changes.
            let region = Int.random(in: 0..<2, using: &random)
            try frontend.addMemoryRegion(world.memory.regions[region], fd: world.memory.fds[region])
        case .sameFeatures:
            try frontend.setFeatures(features)
        case .stopAllAndRestart:
            // QEMU's vhost stop and start: GET_VRING_BASE everywhere, maybe new features or memory,
            // then every ring from where it stopped.
            for ring in 0..<4 where rings[ring].stoppedAt == nil { try stopRing(ring, frontend: frontend, world: world, pairs: pairs) }
            if chance(2, in: 3) {
                features = featureVariant(changingIndirect: false)
                try frontend.setFeatures(features)
            }
            if chance(1, in: 3) { try setMemoryTable(withExtra: chance(1, in: 2), frontend: frontend, world: world) }
            for ring in 0..<4 { try restartRing(ring, frontend: frontend, world: world, pairs: pairs) }
        case .resetDevice:
            try resetDevice(frontend: frontend, world: world, pairs: pairs)
        case .rarp:
            try frontend.call(.sendRARP, payload: MACAddress(0x52, 0x54, 0x00, 0x5e, 0x57, 0x01).array + [0, 0])
        case .status:
            let status = try frontend.getStatus()
            if status & 0x40 != 0 { violations.record("GET_STATUS reports DEVICE_NEEDS_RESET (0x\(String(status, radix: 16)))") }
        case .config:
            let config = try frontend.getConfig(offset: 0, size: 12)
            if Array(config.prefix(6)) != stressMAC.array { violations.record("GET_CONFIG reports MAC \(config.prefix(6))") }
        case .mtu:
            try frontend.netSetMTU(1500)
        }
    }

    /// GET_VRING_BASE stops the ring. Nothing is in flight in a stopped ring, so where it stopped
    /// must be exactly the used index it published.
    private func stopRing(_ ring: Int, frontend: Frontend, world: StressWorld, pairs: [GuestPair]) throws {
        let reply = try frontend.getVringBase(UInt32(ring))
        guard reply.index == UInt32(ring), let base = UInt16(exactly: reply.base) else {
            violations.record("GET_VRING_BASE for ring \(ring) answered ring \(reply.index), base \(reply.base)")
            rings[ring].stoppedAt = 0
            return
        }
        let usedIndex = guestRing(ring, pairs).usedIndex
        if base != usedIndex {
            violations.record("GET_VRING_BASE for ring \(ring) says \(base) but the ring's used.idx is \(usedIndex): chains were lost or used twice")
        }
        rings[ring].stoppedAt = base
    }

    /// SET_VRING_BASE with where it stopped and a new kick (maybe with NUM and ADDR again, and a new call).
    private func restartRing(_ ring: Int, frontend: Frontend, world: StressWorld, pairs: [GuestPair]) throws {
        guard let base = rings[ring].stoppedAt else { return }
        try startRing(ring, base: base, full: chance(1, in: 2), newCall: chance(1, in: 3), frontend: frontend, world: world, pairs: pairs)
        rings[ring].stoppedAt = nil
    }

    private func startRing(_ ring: Int, base: UInt16, full: Bool, newCall: Bool, frontend: Frontend, world: StressWorld, pairs: [GuestPair]) throws {
        let index = UInt32(ring)
        let guest = guestRing(ring, pairs)
        if full { try frontend.setVringNum(index, UInt32(GuestRing.size)) }
        try frontend.setVringBase(index, UInt32(base))
        if full {
            try frontend.setVringAddr(index, descriptorTable: guest.userAddress(guest.descriptorTable),
                                      usedRing: guest.userAddress(guest.usedRing), availableRing: guest.userAddress(guest.availableRing))
        }
        try frontend.setVringKick(index, fd: try world.eventFDs.replaceKick(ring).rawValue)
        let call = newCall ? try world.eventFDs.replaceCall(ring) : world.eventFDs.call(ring)
        try frontend.setVringCall(index, fd: call.rawValue)
    }

    private func setMemoryTable(withExtra: Bool, frontend: Frontend, world: StressWorld) throws {
        let memory = world.memory
        try frontend.setMemTable(memory.regions + (withExtra ? [memory.extra] : []), fds: memory.fds + (withExtra ? [memory.extraFD] : []))
        extraMapped = withExtra
    }

    /// The offered features less some groups the guest does not depend on (mergeable buffers, event
    /// index, receive and transmit offloads); indirect descriptors too when the guest is told.
    private func featureVariant(changingIndirect: Bool) -> UInt64 {
        var groups: [VirtioNetFeatures] = [.mergeableRxBuffers, .eventIndex, .guestOffloads, .hostOffloads]
        if changingIndirect { groups.append(.indirectDescriptors) }
        var variant = offered
        if !changingIndirect {
            variant = variant & ~VirtioNetFeatures.indirectDescriptors.rawValue | features & VirtioNetFeatures.indirectDescriptors.rawValue
        }
        for group in groups where chance(1, in: 2) { variant &= ~group.rawValue }
        return variant
    }

    /// RESET_DEVICE with the guests paused: the guest takes back what was used, the rest is
    /// abandoned (exactly avail.idx - used.idx chains per ring), the rings are laid out afresh, and
    /// the frontend negotiates again (maybe with other features, indirect descriptors included).
    private func resetDevice(frontend: Frontend, world: StressWorld, pairs: [GuestPair]) throws {
        guard world.control.pauseGuests(pairs.count) else {
            violations.record("the guest threads did not pause for RESET_DEVICE")
            return
        }
        defer { world.control.resumeGuests() }
        if chance(1, in: 2) {
            for ring in 0..<4 where rings[ring].stoppedAt == nil { try stopRing(ring, frontend: frontend, world: world, pairs: pairs) }
        }
        try frontend.call(.resetDevice)
        resets += 1
        for pair in pairs {
            pair.reap()
            for ring in [pair.receive, pair.transmit] {
                let unconsumed = Int(ring.availableIndex &- ring.usedIndex)
                if ring.outstanding != unconsumed {
                    violations.record("ring \(ring.index) at RESET_DEVICE: \(ring.outstanding) chains outstanding, but avail.idx - used.idx is \(unconsumed)")
                }
            }
            pair.abandonAndReset()
        }
        // The backend forgot the rings: it holds no copy of any kick or call eventfd now.
        let descriptors = ProcessResources.descriptors()
        for event in world.eventFDs.all {
            let copies = ProcessView.otherCopies(of: event.rawValue, in: descriptors)
            if !copies.isEmpty { violations.record("after RESET_DEVICE, descriptors \(copies) are still copies of ring eventfd \(event.rawValue)") }
        }
        rings = Array(repeating: Ring(), count: 4)
        features = featureVariant(changingIndirect: true)
        let indirect = features & VirtioNetFeatures.indirectDescriptors.rawValue != 0
        for pair in pairs { pair.useIndirect = indirect }
        try frontend.setFeatures(features)
        try setMemoryTable(withExtra: chance(1, in: 4), frontend: frontend, world: world)
        for ring in 0..<4 { try startRing(ring, base: 0, full: true, newCall: chance(1, in: 2), frontend: frontend, world: world, pairs: pairs) }
        for ring in 0..<4 { try frontend.setVringEnable(UInt32(ring), true) }
    }

    private func guestRing(_ ring: Int, _ pairs: [GuestPair]) -> GuestRing {
        ring % 2 == 0 ? pairs[ring / 2].receive : pairs[ring / 2].transmit
    }

    /// Lets traffic move between messages: until the guests made some progress, at most about 5 ms.
    private func pace(_ pairs: [GuestPair]) {
        let before = pairs.reduce(0) { $0 + $1.status.withLock { $0.progress } }
        _ = eventually(timeout: 0.005) { pairs.reduce(0) { $0 + $1.status.withLock { $0.progress } } >= before + 8 }
    }

    // MARK: Checks

    private func dropCounters(_ device: NetDevice) -> [String] {
        device.queuePairCounters.enumerated().flatMap { pair, counters in
            [("rx", counters.receive), ("tx", counters.transmit)].flatMap { name, queue in
                DropReason.allCases.compactMap { reason in
                    let count = queue.dropped(reason)
                    return count == 0 ? nil : "pair \(pair) \(name) \(reason): \(count)"
                }
            }
        }
    }

    /// Every frame sent either arrived once, intact, or was counted as dropped; the device's own
    /// counters agree with what the guest saw.
    private func account(_ pair: GuestPair, world: StressWorld) {
        let counters = world.device.queuePairCounters[pair.pair]
        let ledger = pair.ledger
        let drops = Int(counters.receive.dropped(.tooLarge))
        let rarpSent = pair.pair == 0 ? world.backend.rarpFrames.sent : 0
        let rarpLost = rarpSent - ledger.receivedRARP
        if ledger.lost > drops {
            violations.record("pair \(pair.pair): \(ledger.lost) frames sent never arrived, and only \(drops) drops were counted")
        }
        if drops > ledger.lost + max(0, rarpLost) {
            violations.record("pair \(pair.pair): \(drops) receive drops counted for \(ledger.lost) lost frames and \(rarpLost) lost RARP frames")
        }
        if rarpLost < 0 { violations.record("pair 0: \(ledger.receivedRARP) RARP frames arrived, \(rarpSent) were sent") }
        for reason in DropReason.allCases {
            let received = counters.receive.dropped(reason), transmitted = counters.transmit.dropped(reason)
            if (reason != .tooLarge && received != 0) || transmitted != 0 {
                violations.record("pair \(pair.pair): \(reason) drops (RX \(received), TX \(transmitted)); none expected")
            }
        }
        if counters.transmit.frames.current != UInt64(ledger.completed) {
            violations.record("pair \(pair.pair): the device counted \(counters.transmit.frames.current) frames sent, the guest got \(ledger.completed) TX chains back")
        }
        let received = ledger.receivedGuest + ledger.receivedHost + ledger.receivedRARP
        if counters.receive.frames.current != UInt64(received) {
            violations.record("pair \(pair.pair): the device counted \(counters.receive.frames.current) frames received, the guest got \(received)")
        }
        if world.backend.loopback.pendingFrames(queue: pair.pair) != 0 {
            violations.record("pair \(pair.pair): \(world.backend.loopback.pendingFrames(queue: pair.pair)) frames still wait in the backend")
        }
    }

    /// What of the connection is still there: worker epolls on the backend's queues, the service
    /// thread, the sockets, the backend's copies of ring eventfds and memfds, its memory mappings.
    private func leftovers(world: StressWorld, socketInodes: Set<String>) -> [String] {
        var found: [String] = []
        let descriptors = ProcessResources.descriptors()
        let queues = Set((0..<2).map { world.backend.descriptor(queue: $0) })
        let epolls = descriptors.filter { $0.value.isEpoll && !queues.isDisjoint(with: $0.value.watches) }
        if !epolls.isEmpty { found.append("worker epolls \(epolls.keys.sorted()) still watch the backend's queues") }
        let serviceThreads = ProcessResources.threads(named: "vhost-\(stressMAC.description.suffix(5))")
        if !serviceThreads.isEmpty { found.append("service threads \(serviceThreads) still run") }
        let sockets = descriptors.filter { file in socketInodes.contains { file.value.target == "socket:[\($0)]" } }
        if !sockets.isEmpty { found.append("sockets \(sockets.keys.sorted()) of the vhost-user path are open (inodes \(socketInodes), \(sockets.values.map(\.identity)))") }
        for event in world.eventFDs.all {
            let copies = ProcessView.otherCopies(of: event.rawValue, in: descriptors)
            if !copies.isEmpty { found.append("descriptors \(copies) are copies of ring eventfd \(event.rawValue)") }
        }
        for (name, fd) in zip(world.memory.names + [world.memory.extraName], world.memory.fds + [world.memory.extraFD]) {
            let copies = ProcessView.otherCopies(of: fd, in: descriptors)
            if !copies.isEmpty { found.append("descriptors \(copies) are copies of memfd \(name)") }
        }
        for name in world.memory.names where mappings(of: name) != 1 {
            found.append("memfd \(name) is mapped \(mappings(of: name)) times (the guest's own mapping only expected)")
        }
        if mappings(of: world.memory.extraName) != 0 {
            found.append("the extra region is still mapped \(mappings(of: world.memory.extraName)) times")
        }
        return found
    }

    private func summarize(_ pairs: [GuestPair], world: StressWorld, seconds: Double) -> String {
        let messages = actions.values.reduce(0, +)
        let kinds = Action.allCases.compactMap { action in actions[action].map { "\(action.rawValue) \($0) \(Int(1000 * (actionTime[action] ?? 0) / Double($0))) ms" } }.joined(separator: ", ")
        let traffic = pairs.map { pair in
            let ledger = pair.ledger
            return "pair \(pair.pair): \(ledger.completed) TX chains used (\(ledger.abandoned) abandoned at resets), "
                + "\(ledger.receivedGuest) looped back + \(ledger.receivedHost) injected + \(ledger.receivedRARP) RARP received, "
                + "\(world.device.queuePairCounters[pair.pair].receive.dropped(.tooLarge)) counted drops"
        }.joined(separator: "; ")
        return "\(messages) storm actions in \(String(format: "%.1f", seconds)) s (\(kinds)); \(resets) device resets; \(traffic)"
    }
}
