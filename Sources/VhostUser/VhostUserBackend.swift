#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Logging
import Synchronization
import Sys
import VirtioNet
import Virtqueue

/// One vhost-user frontend's view of a `NetDevice`: it turns the frontend's messages into feature
/// negotiation, guest memory, and queues that start and stop as the protocol says.
///
/// Every message is untrusted: sizes, counts, indices and descriptors are checked before use. A
/// refused message is an error the caller answers (REPLY_ACK) or ends the connection with; the device
/// and every other connection go on.
public final class VhostUserBackend {
    public let device: NetDevice
    let logger: Logger
    /// Memory slots offered with CONFIGURE_MEM_SLOTS: as many as QEMU uses (it caps backends at 509).
    public static let maximumMemorySlots = 509
    /// Ring messages name a ring in 8 bits (SET_VRING_KICK and its kin): 256 rings, 128 queue pairs.
    public static let maximumQueuePairs = 128
    /// SET_MEM_TABLE carries at most this many regions.
    public static let memTableRegions = 8
    /// Guest memory one frontend may map unless configured otherwise: 1 TiB. Mappings take address
    /// space, which every device of the process shares (128 TiB on x86-64).
    public static let defaultMemoryLimit: UInt64 = 1 << 40
    /// The most bytes of guest memory (the sum of region sizes) this frontend may map.
    public let memoryLimit: UInt64

    private struct Ring {
        var size: Int?
        /// Where the ring resumes (SET_VRING_BASE, or where it stopped); nil: fresh.
        var base: UInt32?
        var addresses: RingAddresses?
        var kick: EventFD?
        var call: EventFD?
        var error: EventFD?
        var enabled = false
        /// The used ring's guest-physical address for dirty logging (SET_VRING_ADDR's VHOST_VRING_F_LOG).
        var usedLog: UInt64?
    }

    private struct Region {
        let description: MemoryRegionDescription
        let region: GuestMemoryRegion
    }

    private var rings: [Ring]
    private var regions: [Region] = []
    private var memory: GuestMemory?
    private var acknowledgedFeatures: UInt64?
    private var protocolFeatures: VhostUserProtocolFeatures = []
    /// SET_PROTOCOL_FEATURES came, or SET_FEATURES carried bit 30: rings start disabled.
    private var protocolFeaturesNegotiated = false
    private var status: UInt8 = 0
    /// Live migration: the log the frontend shared (SET_LOG_BASE), whether it asked for logging
    /// (VHOST_F_LOG_ALL), and the eventfd it may want to hear about changes on.
    private var dirtyLog: DirtyLog?
    private var logAll = false
    private var logChanged: EventFD?
    /// Rings running now, and the queue pairs the device was last told carry traffic.
    private var running: Set<Int> = []
    private var activePairs = 0

    public init(device: NetDevice, logger: Logger, memoryLimit: UInt64 = VhostUserBackend.defaultMemoryLimit) {
        self.device = device
        self.logger = logger
        self.memoryLimit = memoryLimit
        rings = Array(repeating: Ring(), count: 2 * device.configuration.queuePairs)
    }

    /// The frontend's eventfds (kick, call, error) the rings hold, as counted after the last message
    /// (before its reply went out); safe to read from any thread.
    public var eventFDCount: Int { eventFDTally.count }
    /// The same count, shareable with other threads (metrics).
    public let eventFDTally = Tally()

    /// A count one thread sets and any thread reads.
    public final class Tally: Sendable {
        private let value = Atomic<Int>(0)
        public var count: Int { value.load(ordering: .relaxed) }
        func set(_ count: Int) { value.store(count, ordering: .relaxed) }
    }

    private func countEventFDs() {
        var seen = Set<ObjectIdentifier>()
        for ring in rings {
            for event in [ring.kick, ring.call, ring.error] {
                if let event { seen.insert(ObjectIdentifier(event)) }
            }
        }
        eventFDTally.set(seen.count)
    }

    /// What GET_FEATURES offers: the device's features, minus those the frontend handles itself (the
    /// control queue and what depends on it), plus VHOST_USER_F_PROTOCOL_FEATURES.
    public var offeredFeatures: UInt64 {
        let frontendOwned: VirtioNetFeatures = [.ctrlVQ, .ctrlRx, .ctrlMACAddress, .ctrlGuestOffloads]
        // GUEST_ANNOUNCE is the frontend's too (it owns the control queue and config space), but only
        // a backend that offers it lets the frontend offer it to the guest.
        return device.offeredFeatures.subtracting(frontendOwned).rawValue | vhostUserProtocolFeaturesBit | vhostLogAllBit
            | Self.guestAnnounceBit
    }

    /// VIRTIO_NET_F_GUEST_ANNOUNCE: the guest announces itself after a migration when asked.
    static let guestAnnounceBit: UInt64 = 1 << 21

    /// The features the device itself negotiates. MQ is the frontend's business (it owns the control
    /// queue and enables ring pairs with SET_VRING_ENABLE), so it is offered but not passed on.
    static func deviceFeatures(_ features: UInt64) -> VirtioNetFeatures {
        VirtioNetFeatures(rawValue: features & ~(vhostUserProtocolFeaturesBit | vhostLogAllBit | guestAnnounceBit)).subtracting(.mq)
    }

    /// Whether the frontend asked for REPLY_ACK on this message and negotiated it.
    func wantsAck(_ header: VhostUserHeader) -> Bool {
        header.needsReply && protocolFeatures.contains(.replyAck)
    }

    /// Handles one message. Returns the reply payload for requests that have one.
    /// Throws for a refused message; the caller replies with failure or ends the connection.
    public func handle(_ header: VhostUserHeader, payload: [UInt8], fds: [ReceivedFD]) throws(VhostUserError) -> [UInt8]? {
        defer { countEventFDs() }
        let limits = VhostUserMessage.Limits(rings: rings.count, maximumQueueSize: device.configuration.maximumQueueSize,
                                             memTableRegions: Self.memTableRegions)
        switch try VhostUserMessage.decode(header, payload: payload, fds: fds, limits: limits) {
        case .getFeatures: return reply64(offeredFeatures)
        case .setFeatures(let features): try setFeatures(features)
        case .getProtocolFeatures: return reply64(VhostUserProtocolFeatures.supported.rawValue)
        case .setProtocolFeatures(let features):
            protocolFeatures = features
            protocolFeaturesNegotiated = true
        case .setOwner: break
        // Protocol features are negotiated once per connection (QEMU does not send them again).
        case .resetOwner, .resetDevice: resetDevice()
        case .getQueueNum: return reply64(UInt64(device.configuration.queuePairs))
        case .getMaxMemSlots: return reply64(UInt64(Self.maximumMemorySlots))
        case .setMemTable(let regions): try setMemTable(regions)
        case .addMemoryRegion(let description, let fd): try addMemoryRegion(description, fd: fd)
        case .removeMemoryRegion(let description): try removeMemoryRegion(description)
        case .setVringNum(let index, let size): try changeRing(index) { $0.size = size }
        case .setVringAddr(let index, let addresses, let log):
            try changeRing(index) {
                $0.addresses = addresses
                $0.usedLog = log
            }
        case .setVringBase(let index, let base):
            try validateBase(base, ring: index)
            try changeRing(index) { $0.base = base }
        case .getVringBase(let index): return getVringBase(index)
        case .setVringKick(let index, let event): try changeRing(index) { $0.kick = event }
        case .setVringCall(let index, let event): try changeRing(index) { $0.call = event }
        case .setVringErr(let index, let event): try changeRing(index) { $0.error = event }
        case .setVringEnable(let index, let enabled): try setVringEnable(index, enabled)
        case .netSetMTU(let mtu): try setMTU(mtu)
        case .getConfig(let offset, let size, let flags):
            var writer = PayloadWriter()
            writer.u32(offset)
            writer.u32(size)
            writer.u32(flags)
            writer.append(device.configSpace.read(offset: Int(offset), length: Int(size)))
            return writer.bytes
        case .setConfig: throw VhostUserError("SET_CONFIG: the configuration space is read-only")
        case .sendRARP(let mac): device.announce(mac: mac)
        case .setStatus(let byte): status = byte
        case .getStatus: return reply64(UInt64(status) | (device.needsReset ? 0x40 : 0))
        case .setLogBase(let size, let offset, let fd):
            do { dirtyLog = try DirtyLog(fd: fd.rawValue, size: size, offset: offset) } catch {
                throw VhostUserError("SET_LOG_BASE: \(error)")
            }
            updateLogging()
            return reply64(0)
        case .setLogFD(let event): logChanged = event
        }
        return nil
    }

    private func reply64(_ value: UInt64) -> [UInt8] {
        var writer = PayloadWriter()
        writer.u64(value)
        return writer.bytes
    }

    /// Stops everything and forgets the frontend's state (the connection ended).
    public func reset() {
        resetDevice()
        protocolFeatures = []
        protocolFeaturesNegotiated = false
        countEventFDs()
    }

    /// Back to the state after connecting, protocol features kept (RESET_OWNER, RESET_DEVICE). What a
    /// frontend changed on the device (NET_SET_MTU) returns to the configuration.
    func resetDevice() {
        device.reset()
        running = []
        activePairs = 0
        rings = Array(repeating: Ring(), count: rings.count)
        regions = []
        memory = nil
        acknowledgedFeatures = nil
        status = 0
        dirtyLog = nil
        logAll = false
        logChanged = nil
        device.stopDirtyLogging()
        let configured = device.configuration.mtu
        if device.mtu != configured { try? device.setMTU(configured) }
    }

    // MARK: Features and MTU

    private func setFeatures(_ features: UInt64) throws(VhostUserError) {
        let notOffered = features & ~offeredFeatures
        guard notOffered == 0 else {
            throw VhostUserError("SET_FEATURES acknowledges features that were not offered: 0x\(String(notOffered, radix: 16))")
        }
        guard features != acknowledgedFeatures else { return }
        logAll = features & vhostLogAllBit != 0
        updateLogging()
        let first = acknowledgedFeatures == nil
        let deviceChanges = acknowledgedFeatures.map { Self.deviceFeatures($0) != Self.deviceFeatures(features) } ?? true
        acknowledgedFeatures = features
        if features & vhostUserProtocolFeaturesBit != 0 { protocolFeaturesNegotiated = true }
        if first && !protocolFeaturesNegotiated {
            // Without protocol features, rings are enabled from the start.
            for index in rings.indices { rings[index].enabled = true }
        }
        if deviceChanges && device.isActive {
            // The engines were built for the old features: every ring stops and starts again.
            for state in device.reset() where state.index < rings.count {
                rings[state.index].base = state.base
            }
            running = []
            activePairs = 0
        }
        try refreshRings()
    }

    private func setMTU(_ mtu: Int) throws(VhostUserError) {
        do { try device.setMTU(mtu) } catch { throw VhostUserError("NET_SET_MTU \(mtu): \(error)") }
        // The engines hold the MTU (the largest frame); running rings restart where they were.
        let failure = keep(device.restartQueues())
        try refreshRings()
        if let failure { throw VhostUserError("NET_SET_MTU \(mtu): \(failure)") }
    }

    /// Dirty logging runs while the frontend asks for it (VHOST_F_LOG_ALL) and has shared a log;
    /// switching it needs no ring to stop.
    private func updateLogging() {
        if logAll, let dirtyLog {
            device.startDirtyLogging(into: dirtyLog)
        } else {
            device.stopDirtyLogging()
        }
    }

    // MARK: Memory

    private func setMemTable(_ table: [(MemoryRegionDescription, ReceivedFD)]) throws(VhostUserError) {
        var newRegions: [Region] = []
        for (description, fd) in table { newRegions.append(try Self.map(description, fd: fd)) }
        try replaceMemory(with: newRegions)
    }

    private func addMemoryRegion(_ description: MemoryRegionDescription, fd: ReceivedFD) throws(VhostUserError) {
        // QEMU 7.2 sends each region once per queue pair; the same region again changes nothing.
        if regions.contains(where: { Self.sameRegion($0.description, description) && $0.description.mmapOffset == description.mmapOffset }) {
            return
        }
        guard regions.count < Self.maximumMemorySlots else { throw VhostUserError("ADD_MEM_REG beyond \(Self.maximumMemorySlots) slots") }
        try replaceMemory(with: regions + [try Self.map(description, fd: fd)])
    }

    private func removeMemoryRegion(_ description: MemoryRegionDescription) throws(VhostUserError) {
        guard let index = regions.firstIndex(where: { Self.sameRegion($0.description, description) }) else {
            // Also sent once per queue pair by QEMU 7.2: the region is already gone.
            logger.debug("REM_MEM_REG for a region that is not mapped", metadata: ["guest_address": "\(description.guestAddress)"])
            return
        }
        var remaining = regions
        remaining.remove(at: index)
        try replaceMemory(with: remaining)
    }

    private static func sameRegion(_ a: MemoryRegionDescription, _ b: MemoryRegionDescription) -> Bool {
        a.guestAddress == b.guestAddress && a.size == b.size && a.userAddress == b.userAddress
    }

    private static func map(_ description: MemoryRegionDescription, fd: ReceivedFD) throws(VhostUserError) -> Region {
        do {
            // The mapping keeps the memory; the descriptor closes when `fd` goes.
            let region = try GuestMemoryRegion(description: description, fd: fd.rawValue)
            return Region(description: description, region: region)
        } catch {
            throw VhostUserError("memory region at \(description.guestAddress) (\(description.size) bytes, offset \(description.mmapOffset)): \(error)")
        }
    }

    /// The new memory table: running rings move to it where they stand (the backend untouched); a
    /// ring whose rings lie outside it stops, and the error says so.
    private func replaceMemory(with newRegions: [Region]) throws(VhostUserError) {
        let total = newRegions.reduce(UInt64(0)) { $0.addingReportingOverflow($1.description.size).partialValue }
        guard total <= memoryLimit, newRegions.allSatisfy({ $0.description.size <= memoryLimit }) else {
            throw VhostUserError("guest memory of \(total) bytes is more than this device may map (\(memoryLimit) bytes)")
        }
        let newMemory: GuestMemory?
        if newRegions.isEmpty {
            newMemory = nil
        } else {
            do { newMemory = try GuestMemory(regions: newRegions.map(\.region)) } catch {
                throw VhostUserError("memory table refused: \(error)")
            }
        }
        regions = newRegions
        memory = newMemory
        var failure: VhostUserError? = nil
        if let newMemory, device.isActive {
            if let stopped = keep(device.replaceMemory(newMemory)) {
                failure = VhostUserError("rings stopped by the new memory table: \(stopped)")
            }
        } else if newMemory == nil {
            stop(Array(running))
        }
        do { try refreshRings() } catch { failure = failure ?? error }
        if let failure { throw failure }
    }

    // MARK: Rings

    private var packedRings: Bool { (acknowledgedFeatures ?? 0) & VirtioNetFeatures.ringPacked.rawValue != 0 }

    /// A split ring's base is a 16-bit index; a packed ring's two positions must lie in the ring
    /// (checked again when the ring starts, against the size it has then).
    private func validateBase(_ base: UInt32, ring index: Int) throws(VhostUserError) {
        let hex = "0x" + String(base, radix: 16)
        guard packedRings else {
            guard base <= 0xffff else { throw VhostUserError("SET_VRING_BASE \(hex) for split ring \(index): more than 16 bits") }
            return
        }
        if let size = rings[index].size, Int(base & 0x7fff) >= size || Int((base >> 16) & 0x7fff) >= size {
            throw VhostUserError("SET_VRING_BASE \(hex) for packed ring \(index): a position past its \(size) entries")
        }
    }

    private func getVringBase(_ index: Int) -> [UInt8] {
        // Stops the ring: it runs again only after a new SET_VRING_KICK.
        stop([index])
        rings[index].kick = nil
        try? refreshRings()
        var writer = PayloadWriter()
        writer.u32(UInt32(index))
        writer.u32(rings[index].base ?? (packedRings ? PackedQueue.freshBase : 0))
        return writer.bytes
    }

    private func setVringEnable(_ index: Int, _ enabled: Bool) throws(VhostUserError) {
        // QEMU sends this right after SET_PROTOCOL_FEATURES, before SET_FEATURES.
        guard protocolFeaturesNegotiated else {
            throw VhostUserError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        }
        guard rings[index].enabled != enabled else { return }
        rings[index].enabled = enabled
        try refreshRings()
    }

    /// A running ring stops for the change (saving where it was) and starts again with it; the other
    /// rings, and the other queue pairs, run on.
    private func changeRing(_ index: Int, _ change: (inout Ring) -> Void) throws(VhostUserError) {
        if running.contains(index) { stop([index]) }
        change(&rings[index])
        try refreshRings()
    }

    /// Notes the rings a change to all of them could not start again (where each stopped); returns
    /// the first one's error, if any.
    private func keep(_ stopped: [NetDevice.StoppedQueue]) -> NetDeviceError? {
        for queue in stopped where queue.state.index < rings.count {
            rings[queue.state.index].base = queue.state.base
            running.remove(queue.state.index)
        }
        return stopped.first?.error
    }

    /// Stops rings that run, saving where each stopped.
    private func stop(_ indices: [Int]) {
        let stopping = indices.filter { running.contains($0) }
        guard !stopping.isEmpty else { return }
        for state in device.stopQueues(stopping) where state.index < rings.count {
            rings[state.index].base = state.base
        }
        running.subtract(stopping)
    }

    /// A ring runs when it has a size, addresses, a kick descriptor and is enabled, and memory and
    /// features are known. Starts the rings that are ready and not running (activating the device
    /// first), stops those running that are no longer ready, and tells the device which queue pairs
    /// carry traffic. Only the rings that change stop or start.
    private func refreshRings() throws(VhostUserError) {
        let ready: Set<Int>
        if memory != nil, acknowledgedFeatures != nil {
            ready = Set(rings.indices.filter { rings[$0].size != nil && rings[$0].addresses != nil && rings[$0].kick != nil && rings[$0].enabled })
        } else {
            ready = []
        }
        stop(Array(running.subtracting(ready)))
        let starting = ready.subtracting(running).sorted()
        var failure: VhostUserError? = nil
        if !starting.isEmpty, let memory, let features = acknowledgedFeatures {
            if !device.isActive {
                do {
                    try device.acknowledge(features: Self.deviceFeatures(features))
                    try device.activate(memory: memory, queues: [])
                } catch {
                    device.reset()
                    throw VhostUserError("cannot activate the device: \(error)")
                }
            }
            for index in starting {
                let ring = rings[index]
                guard let size = ring.size, let addresses = ring.addresses else { continue }
                do {
                    try device.startQueues([QueueConfiguration(
                        index: index, size: size, rings: addresses, base: ring.base,
                        kick: ring.kick, call: ring.call, error: ring.error, usedRingLogAddress: ring.usedLog)])
                    running.insert(index)
                } catch {
                    failure = failure ?? VhostUserError("cannot start ring \(index): \(error)")
                }
            }
        }
        let pairs = running.isEmpty ? 0 : running.max()! / 2 + 1
        if pairs > 0 && pairs != activePairs {
            do { try device.setActiveQueuePairs(pairs) } catch {
                failure = failure ?? VhostUserError("cannot enable \(pairs) queue pairs: \(error)")
            }
            activePairs = pairs
        }
        if !starting.isEmpty || !ready.isSuperset(of: running) {
            logger.info("rings running", metadata: ["rings": "\(running.sorted())"])
        }
        if let failure { throw failure }
    }
}
