#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Logging
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
    /// Memory slots offered with CONFIGURE_MEM_SLOTS.
    public static let maximumMemorySlots = 32
    /// SET_MEM_TABLE carries at most this many regions.
    public static let memTableRegions = 8
    /// Guest memory one frontend may map unless configured otherwise: 1 TiB. Mappings take address
    /// space, which every device of the process shares (128 TiB on x86-64).
    public static let defaultMemoryLimit: UInt64 = 1 << 40
    /// The most bytes of guest memory (the sum of region sizes) this frontend may map.
    public let memoryLimit: UInt64

    private struct Ring {
        var size: Int?
        var nextAvailableIndex: UInt16 = 0
        var addresses: RingAddresses?
        var kick: EventFD?
        var call: EventFD?
        var error: EventFD?
        var enabled = false
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
    /// Rings running now, and whether something they depend on changed since they started.
    private var running: Set<Int> = []
    private var restartNeeded = false

    public init(device: NetDevice, logger: Logger, memoryLimit: UInt64 = VhostUserBackend.defaultMemoryLimit) {
        self.device = device
        self.logger = logger
        self.memoryLimit = memoryLimit
        rings = Array(repeating: Ring(), count: 2 * device.configuration.queuePairs)
    }

    /// The frontend's eventfds (kick, call, error) the rings hold now.
    public var eventFDCount: Int {
        var seen = Set<ObjectIdentifier>()
        for ring in rings {
            for event in [ring.kick, ring.call, ring.error] {
                if let event { seen.insert(ObjectIdentifier(event)) }
            }
        }
        return seen.count
    }

    /// What GET_FEATURES offers: the device's features, minus those the frontend handles itself (the
    /// control queue and what depends on it), plus VHOST_USER_F_PROTOCOL_FEATURES.
    public var offeredFeatures: UInt64 {
        let frontendOwned: VirtioNetFeatures = [.ctrlVQ, .ctrlRx, .ctrlMACAddress, .ctrlGuestOffloads]
        return device.offeredFeatures.subtracting(frontendOwned).rawValue | vhostUserProtocolFeaturesBit
    }

    /// The features the device itself negotiates. MQ is the frontend's business (it owns the control
    /// queue and enables ring pairs with SET_VRING_ENABLE), so it is offered but not passed on.
    static func deviceFeatures(_ features: UInt64) -> VirtioNetFeatures {
        VirtioNetFeatures(rawValue: features & ~vhostUserProtocolFeaturesBit).subtracting(.mq)
    }

    /// Whether the frontend asked for REPLY_ACK on this message and negotiated it.
    func wantsAck(_ header: VhostUserHeader) -> Bool {
        header.needsReply && protocolFeatures.contains(.replyAck)
    }

    /// Handles one message. Returns the reply payload for requests that have one.
    /// Throws for a refused message; the caller replies with failure or ends the connection.
    public func handle(_ header: VhostUserHeader, payload: [UInt8], fds: [ReceivedFD]) throws(VhostUserError) -> [UInt8]? {
        guard let request = VhostUserRequest(rawValue: header.request) else {
            throw VhostUserError("unknown request \(header.request)")
        }
        var reader = PayloadReader(payload)
        func expectFDs(_ count: Int) throws(VhostUserError) {
            guard fds.count == count else { throw VhostUserError("\(request) carries \(fds.count) descriptors, expected \(count)") }
        }
        func expectSize(_ size: Int) throws(VhostUserError) {
            guard payload.count == size else { throw VhostUserError("\(request) payload is \(payload.count) bytes, expected \(size)", fatal: request.hasReply) }
        }
        func u64() throws(VhostUserError) -> UInt64 {
            try expectSize(8)
            return reader.u64()!
        }
        func ringIndex(_ raw: UInt32) throws(VhostUserError) -> Int {
            guard raw < UInt32(rings.count) else { throw VhostUserError("\(request) for ring \(raw); the device has \(rings.count)", fatal: request.hasReply) }
            return Int(raw)
        }
        func reply64(_ value: UInt64) -> [UInt8] {
            var writer = PayloadWriter()
            writer.u64(value)
            return writer.bytes
        }

        switch request {
        case .getFeatures:
            try expectFDs(0)
            return reply64(offeredFeatures)

        case .setFeatures:
            try expectFDs(0)
            let features = try u64()
            let virtio = Self.deviceFeatures(features)
            let notOffered = features & ~offeredFeatures
            guard notOffered == 0 else {
                throw VhostUserError("SET_FEATURES acknowledges features that were not offered: 0x\(String(notOffered, radix: 16))")
            }
            if features != acknowledgedFeatures {
                let first = acknowledgedFeatures == nil
                acknowledgedFeatures = features
                if features & vhostUserProtocolFeaturesBit != 0 { protocolFeaturesNegotiated = true }
                if first && !protocolFeaturesNegotiated {
                    // Without protocol features, rings are enabled from the start.
                    for index in rings.indices { rings[index].enabled = true }
                }
                restartNeeded = true
                try reconcile()
            }
            return nil

        case .getProtocolFeatures:
            try expectFDs(0)
            return reply64(VhostUserProtocolFeatures.supported.rawValue)

        case .setProtocolFeatures:
            try expectFDs(0)
            let requested = VhostUserProtocolFeatures(rawValue: try u64())
            guard VhostUserProtocolFeatures.supported.isSuperset(of: requested) else {
                throw VhostUserError("SET_PROTOCOL_FEATURES with unsupported bits 0x\(String(requested.subtracting(.supported).rawValue, radix: 16))")
            }
            protocolFeatures = requested
            protocolFeaturesNegotiated = true
            return nil

        case .setOwner:
            try expectFDs(0)
            return nil

        case .resetOwner, .resetDevice:
            try expectFDs(0)
            // Protocol features are negotiated once per connection (QEMU does not send them again).
            resetDevice()
            return nil

        case .getQueueNum:
            try expectFDs(0)
            return reply64(UInt64(device.configuration.queuePairs))

        case .getMaxMemSlots:
            try expectFDs(0)
            return reply64(UInt64(Self.maximumMemorySlots))

        case .setMemTable:
            guard let count = reader.u32(), reader.u32() != nil else { throw VhostUserError("SET_MEM_TABLE payload too short") }
            guard count >= 1, count <= UInt32(Self.memTableRegions) else { throw VhostUserError("SET_MEM_TABLE with \(count) regions; 1...\(Self.memTableRegions) allowed") }
            try expectSize(8 + 32 * Int(count))
            try expectFDs(Int(count))
            var descriptions: [MemoryRegionDescription] = []
            for _ in 0..<count { descriptions.append(Self.readRegion(&reader)) }
            var newRegions: [Region] = []
            for (description, fd) in zip(descriptions, fds) {
                newRegions.append(try Self.map(description, fd: fd))
            }
            try replaceMemory(with: newRegions)
            return nil

        case .addMemReg:
            try expectSize(8 + 32)
            try expectFDs(1)
            _ = reader.u64()
            let description = Self.readRegion(&reader)
            // QEMU 7.2 sends each region once per queue pair; the same region again changes nothing.
            if regions.contains(where: { Self.sameRegion($0.description, description) && $0.description.mmapOffset == description.mmapOffset }) {
                return nil
            }
            guard regions.count < Self.maximumMemorySlots else { throw VhostUserError("ADD_MEM_REG beyond \(Self.maximumMemorySlots) slots") }
            try replaceMemory(with: regions + [try Self.map(description, fd: fds[0])])
            return nil

        case .remMemReg:
            try expectSize(8 + 32)
            guard fds.count <= 1 else { throw VhostUserError("REM_MEM_REG carries \(fds.count) descriptors") }
            _ = reader.u64()
            let description = Self.readRegion(&reader)
            guard let index = regions.firstIndex(where: { Self.sameRegion($0.description, description) }) else {
                // Also sent once per queue pair by QEMU 7.2: the region is already gone.
                logger.debug("REM_MEM_REG for a region that is not mapped", metadata: ["guest_address": "\(description.guestAddress)"])
                return nil
            }
            var remaining = regions
            remaining.remove(at: index)
            try replaceMemory(with: remaining)
            return nil

        case .setVringNum:
            try expectFDs(0)
            try expectSize(8)
            let index = try ringIndex(reader.u32()!)
            let size = Int(reader.u32()!)
            guard size >= 1, size <= device.configuration.maximumQueueSize, size & (size - 1) == 0 else {
                throw VhostUserError("SET_VRING_NUM \(size) for ring \(index): not a power of two in 1...\(device.configuration.maximumQueueSize)")
            }
            try changeRing(index) { $0.size = size }
            return nil

        case .setVringAddr:
            try expectFDs(0)
            try expectSize(40)
            let index = try ringIndex(reader.u32()!)
            let flags = reader.u32()!
            let descriptorTable = reader.u64()!, usedRing = reader.u64()!, availableRing = reader.u64()!
            _ = reader.u64()  // log address: dirty logging is declined
            guard flags & 1 == 0 else { throw VhostUserError("SET_VRING_ADDR asks for dirty logging, which is not offered") }
            try changeRing(index) {
                $0.addresses = .frontendVirtual(descriptorTable: descriptorTable, availableRing: availableRing, usedRing: usedRing)
            }
            return nil

        case .setVringBase:
            try expectFDs(0)
            try expectSize(8)
            let index = try ringIndex(reader.u32()!)
            guard let base = UInt16(exactly: reader.u32()!) else { throw VhostUserError("SET_VRING_BASE beyond 16 bits for ring \(index)") }
            try changeRing(index) { $0.nextAvailableIndex = base }
            return nil

        case .getVringBase:
            try expectFDs(0)
            try expectSize(8)
            let index = try ringIndex(reader.u32()!)
            // Stops the ring: it runs again only after a new SET_VRING_KICK.
            rings[index].kick = nil
            try? reconcile()
            var writer = PayloadWriter()
            writer.u32(UInt32(index))
            writer.u32(UInt32(rings[index].nextAvailableIndex))
            return writer.bytes

        case .setVringKick, .setVringCall, .setVringErr:
            let value = try u64()
            guard value & ~UInt64(0x1ff) == 0 else { throw VhostUserError("\(request) with unknown bits 0x\(String(value, radix: 16))") }
            let index = try ringIndex(UInt32(value & 0xff))
            let noFD = value & 0x100 != 0
            try expectFDs(noFD ? 0 : 1)
            var event: EventFD? = nil
            if !noFD, let owned = fds[0].take() {
                do { event = try EventFD(adoptingUntrusted: owned) } catch {
                    throw VhostUserError("\(request) for ring \(index): \(error)")
                }
            }
            if request == .setVringKick && event == nil {
                throw VhostUserError("SET_VRING_KICK without a descriptor: polling rings are not supported")
            }
            try changeRing(index) { ring in
                switch request {
                case .setVringKick: ring.kick = event
                case .setVringCall: ring.call = event
                default: ring.error = event
                }
            }
            return nil

        case .setVringEnable:
            try expectFDs(0)
            try expectSize(8)
            let index = try ringIndex(reader.u32()!)
            let enable = reader.u32()!
            guard enable <= 1 else { throw VhostUserError("SET_VRING_ENABLE \(enable) for ring \(index)") }
            // QEMU sends this right after SET_PROTOCOL_FEATURES, before SET_FEATURES.
            guard protocolFeaturesNegotiated else {
                throw VhostUserError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
            }
            rings[index].enabled = enable == 1
            try reconcile()
            return nil

        case .netSetMTU:
            try expectFDs(0)
            let value = try u64()
            guard let mtu = Int(exactly: value), (NetConfiguration.minimumMTU...NetConfiguration.maximumMTU).contains(mtu) else {
                throw VhostUserError("NET_SET_MTU \(value) is outside \(NetConfiguration.minimumMTU)...\(NetConfiguration.maximumMTU)")
            }
            do {
                try device.setMTU(mtu)
            } catch {
                throw VhostUserError("NET_SET_MTU \(mtu): \(error)")
            }
            restartNeeded = true
            try reconcile()
            return nil

        case .getConfig:
            try expectFDs(0)
            guard let offset = reader.u32(), let size = reader.u32(), let flags = reader.u32(),
                  size <= 256, payload.count == 12 + Int(size)
            else { throw VhostUserError("GET_CONFIG with an inconsistent size", fatal: true) }
            var writer = PayloadWriter()
            writer.u32(offset)
            writer.u32(size)
            writer.u32(flags)
            writer.append(device.configSpace.read(offset: Int(offset), length: Int(size)))
            return writer.bytes

        case .setConfig:
            try expectFDs(0)
            throw VhostUserError("SET_CONFIG: the configuration space is read-only")

        case .sendRARP:
            try expectFDs(0)
            guard let mac = MACAddress(Array(try u64ToBytes(u64()).prefix(6))) else {
                throw VhostUserError("SEND_RARP without a MAC address")
            }
            device.announce(mac: mac)
            return nil

        case .setStatus:
            try expectFDs(0)
            let value = try u64()
            guard let byte = UInt8(exactly: value) else { throw VhostUserError("SET_STATUS \(value) is not a status byte") }
            status = byte
            return nil

        case .getStatus:
            try expectFDs(0)
            return reply64(UInt64(status) | (device.needsReset ? 0x40 : 0))

        case .setLogBase, .setLogFD:
            throw VhostUserError("\(request): dirty-page logging (live migration) is not offered")

        case .setBackendReqFD, .iotlbMessage, .setVringEndian, .vringKick:
            throw VhostUserError("\(request) is not supported (its protocol feature was not offered)")
        }
    }

    private func u64ToBytes(_ value: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: value >> UInt64(8 * $0)) } }

    /// Stops everything and forgets the frontend's state (the connection ended).
    public func reset() {
        resetDevice()
        protocolFeatures = []
        protocolFeaturesNegotiated = false
    }

    /// Back to the state after connecting, protocol features kept (RESET_OWNER, RESET_DEVICE). What a
    /// frontend changed on the device (NET_SET_MTU) returns to the configuration.
    func resetDevice() {
        device.reset()
        running = []
        restartNeeded = false
        rings = Array(repeating: Ring(), count: rings.count)
        regions = []
        memory = nil
        acknowledgedFeatures = nil
        status = 0
        let configured = device.configuration.mtu
        if device.mtu != configured { try? device.setMTU(configured) }
    }

    // MARK: Memory

    private static func readRegion(_ reader: inout PayloadReader) -> MemoryRegionDescription {
        let guest = reader.u64()!, size = reader.u64()!, user = reader.u64()!, offset = reader.u64()!
        return MemoryRegionDescription(guestAddress: GuestAddress(guest), size: size, userAddress: user, mmapOffset: offset)
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
        // Rings that run use the old mapping until they stop; the restart below maps the new one.
        regions = newRegions
        memory = newMemory
        restartNeeded = true
        try reconcile()
    }

    // MARK: Rings

    private func changeRing(_ index: Int, _ change: (inout Ring) -> Void) throws(VhostUserError) {
        change(&rings[index])
        if running.contains(index) { restartNeeded = true }
        try reconcile()
    }

    /// A ring runs when it has a size, addresses, a kick descriptor and is enabled, and memory and
    /// features are known. Brings the device in line: stops it (saving where each ring stopped) and
    /// starts it again with the rings that should run.
    private func reconcile() throws(VhostUserError) {
        let ready: Set<Int>
        if memory != nil, acknowledgedFeatures != nil {
            ready = Set(rings.indices.filter { rings[$0].size != nil && rings[$0].addresses != nil && rings[$0].kick != nil && rings[$0].enabled })
        } else {
            ready = []
        }
        guard ready != running || restartNeeded else { return }
        restartNeeded = false
        if !running.isEmpty {
            for state in device.reset() where state.index < rings.count {
                rings[state.index].nextAvailableIndex = state.nextAvailableIndex
            }
            running = []
        }
        guard !ready.isEmpty, let memory, let features = acknowledgedFeatures else { return }
        let virtio = Self.deviceFeatures(features)
        let queues = ready.sorted().map { index in
            QueueConfiguration(index: index, size: rings[index].size!, rings: rings[index].addresses!,
                               nextAvailableIndex: rings[index].nextAvailableIndex,
                               kick: rings[index].kick, call: rings[index].call, error: rings[index].error)
        }
        do {
            try device.acknowledge(features: virtio)
            try device.activate(memory: memory, queues: queues)
            let pairs = (ready.max()! / 2) + 1
            try device.backend.setActiveQueuePairs(pairs)
        } catch {
            device.reset()
            throw VhostUserError("cannot start rings \(ready.sorted()): \(error)")
        }
        running = ready
        logger.info("rings running", metadata: ["rings": "\(ready.sorted())"])
    }
}
