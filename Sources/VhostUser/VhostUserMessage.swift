import GuestMemory
import Sys
import VirtioNet
import Virtqueue

/// One vhost-user request, decoded from its header, payload and descriptors and validated: sizes,
/// counts, ring indices and descriptors are checked here, so that handling it can trust it.
enum VhostUserMessage {
    case getFeatures
    case setFeatures(UInt64)
    case getProtocolFeatures
    case setProtocolFeatures(VhostUserProtocolFeatures)
    case setOwner
    case resetOwner
    case resetDevice
    case getQueueNum
    case getMaxMemSlots
    case setMemTable([(MemoryRegionDescription, ReceivedFD)])
    case addMemoryRegion(MemoryRegionDescription, ReceivedFD)
    case removeMemoryRegion(MemoryRegionDescription)
    case setVringNum(ring: Int, size: Int)
    /// `log` is the used ring's address for dirty logging (VHOST_VRING_F_LOG), when asked for.
    case setVringAddr(ring: Int, addresses: RingAddresses, log: UInt64?)
    case setVringBase(ring: Int, base: UInt32)
    case getVringBase(ring: Int)
    case setVringKick(ring: Int, EventFD)
    case setVringCall(ring: Int, EventFD?)
    case setVringErr(ring: Int, EventFD?)
    case setVringEnable(ring: Int, enabled: Bool)
    case netSetMTU(Int)
    case getConfig(offset: UInt32, size: UInt32, flags: UInt32)
    case setConfig
    case sendRARP(MACAddress)
    case setStatus(UInt8)
    case getStatus
    /// The dirty log: `size` bytes of the file from `offset` (VHOST_USER_PROTOCOL_F_LOG_SHMFD).
    case setLogBase(size: UInt64, offset: UInt64, ReceivedFD)
    /// An eventfd to tell the frontend the log changed (optional; nil: none).
    case setLogFD(EventFD?)

    /// The limits a message is checked against.
    struct Limits {
        var rings: Int
        var maximumQueueSize: Int
        var memTableRegions: Int
    }

    /// Decodes and validates one message; a refused one is an error naming the request and the fault.
    static func decode(_ header: VhostUserHeader, payload: [UInt8], fds: [ReceivedFD], limits: Limits) throws(VhostUserError) -> VhostUserMessage {
        guard let request = VhostUserRequest(rawValue: header.request) else {
            throw VhostUserError("unknown request \(header.request)")
        }
        var reader = PayloadReader(payload)
        func expectFDs(_ count: Int) throws(VhostUserError) {
            guard fds.count == count else { throw VhostUserError("\(request) carries \(fds.count) descriptors, expected \(count)") }
        }
        func expectSize(_ size: Int) throws(VhostUserError) {
            guard payload.count == size else {
                throw VhostUserError("\(request) payload is \(payload.count) bytes, expected \(size)", fatal: request.hasReply)
            }
        }
        // Reads after `expectSize` cannot run short; the fallbacks are never taken.
        func u32() -> UInt32 { reader.u32() ?? 0 }
        func u64() -> UInt64 { reader.u64() ?? 0 }
        func only64(fds count: Int = 0) throws(VhostUserError) -> UInt64 {
            try expectFDs(count)
            try expectSize(8)
            return u64()
        }
        func ring(_ raw: UInt32) throws(VhostUserError) -> Int {
            guard raw < UInt32(limits.rings) else {
                throw VhostUserError("\(request) for ring \(raw); the device has \(limits.rings)", fatal: request.hasReply)
            }
            return Int(raw)
        }
        func region() -> MemoryRegionDescription {
            let guest = u64(), size = u64(), user = u64(), offset = u64()
            return MemoryRegionDescription(guestAddress: GuestAddress(guest), size: size, userAddress: user, mmapOffset: offset)
        }
        /// The ring and optional eventfd of SET_VRING_KICK, _CALL and _ERR.
        func ringAndEvent() throws(VhostUserError) -> (Int, EventFD?) {
            try expectSize(8)
            let value = u64()
            guard value & ~UInt64(0x1ff) == 0 else { throw VhostUserError("\(request) with unknown bits 0x\(String(value, radix: 16))") }
            let index = try ring(UInt32(value & 0xff))
            let noFD = value & 0x100 != 0
            try expectFDs(noFD ? 0 : 1)
            guard !noFD, let owned = fds[0].take() else { return (index, nil) }
            do { return (index, try EventFD(adoptingUntrusted: owned)) } catch {
                throw VhostUserError("\(request) for ring \(index): \(error)")
            }
        }

        switch request {
        case .getFeatures: try expectFDs(0); return .getFeatures
        case .setFeatures: return .setFeatures(try only64())
        case .getProtocolFeatures: try expectFDs(0); return .getProtocolFeatures
        case .setProtocolFeatures:
            let requested = VhostUserProtocolFeatures(rawValue: try only64())
            guard VhostUserProtocolFeatures.supported.isSuperset(of: requested) else {
                throw VhostUserError("SET_PROTOCOL_FEATURES with unsupported bits 0x\(String(requested.subtracting(.supported).rawValue, radix: 16))")
            }
            return .setProtocolFeatures(requested)
        case .setOwner: try expectFDs(0); return .setOwner
        case .resetOwner: try expectFDs(0); return .resetOwner
        case .resetDevice: try expectFDs(0); return .resetDevice
        case .getQueueNum: try expectFDs(0); return .getQueueNum
        case .getMaxMemSlots: try expectFDs(0); return .getMaxMemSlots

        case .setMemTable:
            guard let count = reader.u32(), reader.u32() != nil else { throw VhostUserError("SET_MEM_TABLE payload too short") }
            guard count >= 1, count <= UInt32(limits.memTableRegions) else {
                throw VhostUserError("SET_MEM_TABLE with \(count) regions; 1...\(limits.memTableRegions) allowed")
            }
            try expectSize(8 + 32 * Int(count))
            try expectFDs(Int(count))
            return .setMemTable(fds.map { (region(), $0) })

        case .addMemReg:
            try expectSize(8 + 32)
            try expectFDs(1)
            _ = u64()  // padding
            return .addMemoryRegion(region(), fds[0])

        case .remMemReg:
            try expectSize(8 + 32)
            // QEMU attaches the region's descriptor; it is not needed.
            guard fds.count <= 1 else { throw VhostUserError("REM_MEM_REG carries \(fds.count) descriptors") }
            _ = u64()
            return .removeMemoryRegion(region())

        case .setVringNum:
            try expectFDs(0)
            try expectSize(8)
            let index = try ring(u32())
            let size = Int(u32())
            guard SplitQueue.isValidSize(size), size <= limits.maximumQueueSize else {
                throw VhostUserError("SET_VRING_NUM \(size) for ring \(index): not a power of two in 1...\(limits.maximumQueueSize)")
            }
            return .setVringNum(ring: index, size: size)

        case .setVringAddr:
            try expectFDs(0)
            try expectSize(40)
            let index = try ring(u32())
            let flags = u32()
            let descriptorTable = u64(), usedRing = u64(), availableRing = u64(), log = u64()
            guard flags & ~UInt32(1) == 0 else { throw VhostUserError("SET_VRING_ADDR with unknown flags 0x\(String(flags, radix: 16))") }
            return .setVringAddr(ring: index, addresses: .frontendVirtual(descriptorTable: descriptorTable, availableRing: availableRing, usedRing: usedRing),
                                 log: flags & 1 != 0 ? log : nil)

        case .setVringBase:
            try expectFDs(0)
            try expectSize(8)
            let index = try ring(u32())
            // 32 bits: a packed ring's position has its used index in the upper half. A split ring
            // refuses more than 16 when it starts.
            return .setVringBase(ring: index, base: u32())

        case .getVringBase:
            try expectFDs(0)
            try expectSize(8)
            return .getVringBase(ring: try ring(u32()))

        case .setVringKick:
            let (index, event) = try ringAndEvent()
            guard let event else { throw VhostUserError("SET_VRING_KICK without a descriptor: polling rings are not supported") }
            return .setVringKick(ring: index, event)
        case .setVringCall:
            let (index, event) = try ringAndEvent()
            return .setVringCall(ring: index, event)
        case .setVringErr:
            let (index, event) = try ringAndEvent()
            return .setVringErr(ring: index, event)

        case .setVringEnable:
            try expectFDs(0)
            try expectSize(8)
            let index = try ring(u32())
            let enable = u32()
            guard enable <= 1 else { throw VhostUserError("SET_VRING_ENABLE \(enable) for ring \(index)") }
            return .setVringEnable(ring: index, enabled: enable == 1)

        case .netSetMTU:
            let value = try only64()
            guard let mtu = Int(exactly: value), (NetConfiguration.minimumMTU...NetConfiguration.maximumMTU).contains(mtu) else {
                throw VhostUserError("NET_SET_MTU \(value) is outside \(NetConfiguration.minimumMTU)...\(NetConfiguration.maximumMTU)")
            }
            return .netSetMTU(mtu)

        case .getConfig:
            try expectFDs(0)
            guard let offset = reader.u32(), let size = reader.u32(), let flags = reader.u32(),
                  size <= 256, payload.count == 12 + Int(size)
            else { throw VhostUserError("GET_CONFIG with an inconsistent size", fatal: true) }
            return .getConfig(offset: offset, size: size, flags: flags)

        case .setConfig:
            try expectFDs(0)
            return .setConfig

        case .sendRARP:
            let value = try only64()
            guard let mac = MACAddress((0..<6).map { UInt8(truncatingIfNeeded: value >> UInt64(8 * $0)) }) else {
                throw VhostUserError("SEND_RARP without a MAC address")
            }
            return .sendRARP(mac)

        case .setStatus:
            let value = try only64()
            guard let byte = UInt8(exactly: value) else { throw VhostUserError("SET_STATUS \(value) is not a status byte") }
            return .setStatus(byte)

        case .getStatus:
            try expectFDs(0)
            return .getStatus

        case .setLogBase:
            try expectFDs(1)
            try expectSize(16)
            let size = u64(), offset = u64()
            return .setLogBase(size: size, offset: offset, fds[0])

        case .setLogFD:
            guard payload.count == 0 || payload.count == 8 else {
                throw VhostUserError("SET_LOG_FD payload is \(payload.count) bytes, expected 0 or 8")
            }
            guard fds.count <= 1 else { throw VhostUserError("SET_LOG_FD carries \(fds.count) descriptors") }
            guard let owned = fds.first?.take() else { return .setLogFD(nil) }
            do { return .setLogFD(try EventFD(adoptingUntrusted: owned)) } catch {
                throw VhostUserError("SET_LOG_FD: \(error)")
            }

        case .setBackendReqFD, .iotlbMessage, .setVringEndian, .vringKick:
            throw VhostUserError("\(request) is not supported (its protocol feature was not offered)")
        }
    }
}
