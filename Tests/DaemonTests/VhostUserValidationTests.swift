#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import GuestMemory
import Sys
import Testing
import VhostUser
import VirtioNet
import VirtioNetTestSupport

/// What is set up on a fresh connection before a case sends its message.
enum Setup: Sendable {
    /// Nothing: the first message on the connection.
    case fresh
    /// GET/SET_FEATURES (with bit 30) and SET_PROTOCOL_FEATURES with REPLY_ACK: errors are acked.
    case acked
    /// `acked` plus SET_OWNER and SET_MEM_TABLE.
    case memory
    /// A full negotiation of one queue pair with its rings running.
    case running
    /// A full negotiation with the rings set up but not enabled.
    case configured
}

/// One connection's state while a case runs.
final class CaseContext: @unchecked Sendable {
    let served: ServedDevice
    let frontend: Frontend
    let memory: SimulatedGuestMemory
    var guest: SimulatedVhostUserGuest?
    var probes: [ProbeFD] = []

    init(served: ServedDevice, setup: Setup) throws {
        self.served = served
        frontend = try served.connect()
        memory = try SimulatedGuestMemory(regionSize: 4 << 20)
        switch setup {
        case .fresh: break
        case .acked, .memory:
            // Split rings (VhostUserPackedTests has the packed cases).
            try frontend.setFeatures(try frontend.getFeatures() & ~VirtioNetFeatures.ringPacked.rawValue)
            try frontend.setProtocolFeatures(try frontend.getProtocolFeatures() & Frontend.defaultProtocolFeatures)
            if case .memory = setup {
                try frontend.setOwner()
                try frontend.setMemTable(Frontend.regions(of: memory), fds: memory.fds)
            }
        case .running:
            guest = try frontend.negotiate(memory: memory)
        case .configured:
            guest = try frontend.negotiate(memory: memory, enable: false)
        }
    }

    /// Sends with need_reply set (acked when REPLY_ACK is on) and returns the outcome.
    func send(_ request: Frontend.Request, payload: [UInt8] = [], fds: [Int32] = [], flags: UInt32? = nil, size: UInt32? = nil) -> Frontend.Outcome {
        frontend.exchange(request.rawValue, flags: flags ?? (Frontend.version | Frontend.needReplyFlag), payload: payload, fds: fds, size: size)
    }

    /// A memfd whose copies can be counted (see `ProbeFD`).
    func probe(size: Int = 1 << 20) throws -> ProbeFD {
        let probe = try ProbeFD(size: size)
        probes.append(probe)
        return probe
    }

    /// Closes the test's own copies of the probes and waits until no copy is open in the process:
    /// whatever the backend received with a refused message has been closed.
    func expectProbesClosed(sourceLocation: SourceLocation = #_sourceLocation) {
        for probe in probes { probe.closeOwn() }
        for probe in probes {
            #expect(eventually { probe.openCopies == 0 }, "a received descriptor of \(probe.name) stays open: \(probe.openCopies)", sourceLocation: sourceLocation)
        }
    }
}

/// A hostile or broken message, and what must come of it.
struct ValidationCase: Sendable, CustomTestStringConvertible {
    let name: String
    let setup: Setup
    let run: @Sendable (CaseContext) throws -> Void
    var testDescription: String { name }

    init(_ name: String, _ setup: Setup, _ run: @escaping @Sendable (CaseContext) throws -> Void) {
        self.name = name
        self.setup = setup
        self.run = run
    }
}

private func region(_ guest: UInt64, _ size: UInt64, user: UInt64? = nil, offset: UInt64 = 0) -> Frontend.Region {
    Frontend.Region(guestAddress: guest, size: size, userAddress: user ?? guest + 0x7e00_0000_0000, mmapOffset: offset)
}

private let MiB: UInt64 = 1 << 20

/// Every case; each expects a refusal (an error ack, or the connection closed) and no crash.
let validationCases: [ValidationCase] = [
    // Payload sizes.
    ValidationCase("SET_FEATURES with a 4-byte payload", .acked) { c in
        #expect(isErrorAck(c.send(.setFeatures, payload: [0, 0, 0, 0])))
    },
    ValidationCase("SET_VRING_NUM with a 12-byte payload", .acked) { c in
        #expect(isErrorAck(c.send(.setVringNum, payload: Frontend.vringState(0, 256) + [0, 0, 0, 0])))
    },
    ValidationCase("SET_VRING_ADDR with a 32-byte payload", .memory) { c in
        #expect(isErrorAck(c.send(.setVringAddr, payload: Array(Frontend.vringAddress(0, descriptorTable: 0, usedRing: 0, availableRing: 0).prefix(32)))))
    },
    ValidationCase("SET_VRING_KICK with a 4-byte payload", .acked) { c in
        let kick = try EventFD()
        #expect(isErrorAck(c.send(.setVringKick, payload: LE.u32(0), fds: [kick.rawValue])))
    },
    ValidationCase("SET_MEM_TABLE claiming 2 regions but carrying 1", .acked) { c in
        let probe = try c.probe()
        let payload = Frontend.memTablePayload([region(0x10_0000, MiB)], count: 2)
        #expect(isErrorAck(c.send(.setMemTable, payload: payload, fds: [probe.rawValue, probe.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("SET_MEM_TABLE shorter than its header", .acked) { c in
        #expect(isErrorAck(c.send(.setMemTable, payload: [1, 0, 0])))
    },
    ValidationCase("GET_VRING_BASE with a 4-byte payload", .acked) { c in
        #expect(c.send(.getVringBase, payload: LE.u32(0)) == .closed)
    },
    ValidationCase("GET_CONFIG whose size field does not match its payload", .acked) { c in
        #expect(c.send(.getConfig, payload: LE.u32(0) + LE.u32(12) + LE.u32(0) + [0, 0]) == .closed)
    },
    ValidationCase("GET_CONFIG asking for more than 256 bytes", .acked) { c in
        #expect(c.send(.getConfig, payload: Frontend.configPayload(offset: 0, size: 300, flags: 0)) == .closed)
    },
    ValidationCase("a payload of 5000 bytes (more than 4096)", .acked) { c in
        #expect(c.send(.setFeatures, payload: [UInt8](repeating: 0, count: 5000)) == .closed)
    },
    ValidationCase("a header announcing 4097 bytes", .fresh) { c in
        #expect(c.frontend.exchange(Frontend.Request.getFeatures.rawValue, payload: [UInt8](repeating: 0, count: 4097)) == .closed)
    },
    ValidationCase("a header announcing 0xffffffff bytes", .fresh) { c in
        #expect(c.frontend.exchange(Frontend.Request.setOwner.rawValue, payload: [], size: 0xffff_ffff) == .closed)
    },

    // Descriptor counts: refused, and every received descriptor is closed.
    ValidationCase("SET_MEM_TABLE with fewer descriptors than regions", .acked) { c in
        let first = try c.probe()
        _ = try c.probe()  // sent nowhere: its count must stay at the test's own copy, then 0
        let payload = Frontend.memTablePayload([region(0x10_0000, MiB), region(0x20_0000, MiB)])
        #expect(isErrorAck(c.send(.setMemTable, payload: payload, fds: [first.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("SET_MEM_TABLE with more descriptors than regions", .acked) { c in
        let first = try c.probe(), second = try c.probe()
        let payload = Frontend.memTablePayload([region(0x10_0000, MiB)])
        #expect(isErrorAck(c.send(.setMemTable, payload: payload, fds: [first.rawValue, second.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("SET_VRING_KICK with 2 descriptors", .memory) { c in
        let first = try c.probe(), second = try c.probe()
        #expect(isErrorAck(c.send(.setVringKick, payload: LE.u64(0), fds: [first.rawValue, second.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("SET_VRING_KICK with the no-descriptor bit and a descriptor", .memory) { c in
        let probe = try c.probe()
        #expect(isErrorAck(c.send(.setVringKick, payload: LE.u64(0x100), fds: [probe.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("SET_VRING_KICK without a descriptor (polling is not supported)", .memory) { c in
        #expect(isErrorAck(c.send(.setVringKick, payload: LE.u64(0x100))))
        #expect(isErrorAck(c.send(.setVringKick, payload: LE.u64(0))), "no descriptor and no 0x100 bit")
    },
    ValidationCase("SET_VRING_KICK with a descriptor that cannot be polled (a memfd) while the ring runs", .running) { c in
        let probe = try c.probe()
        #expect(isRefusal(c.send(.setVringKick, payload: LE.u64(1), fds: [probe.rawValue])))
        // The ring keeps its (useless) kick descriptor until the frontend goes; then it is closed.
        c.frontend.close()
        c.expectProbesClosed()
    },
    ValidationCase("SET_VRING_KICK with an eventfd in semaphore mode (a read takes one unit: it would stay readable)", .memory) { c in
        let kick = try EventFD(semaphore: true)
        #expect(isErrorAck(c.send(.setVringKick, payload: LE.u64(0), fds: [kick.rawValue])))
        #expect(isErrorAck(c.send(.setVringCall, payload: LE.u64(0), fds: [kick.rawValue])), "nor as a call eventfd")
    },
    ValidationCase("SET_VRING_CALL with unknown bits", .memory) { c in
        let probe = try c.probe()
        #expect(isErrorAck(c.send(.setVringCall, payload: LE.u64(0x200), fds: [probe.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("GET_FEATURES with a descriptor", .fresh) { c in
        let probe = try c.probe()
        #expect(c.frontend.exchange(Frontend.Request.getFeatures.rawValue, fds: [probe.rawValue]) == .closed)
        c.expectProbesClosed()
    },
    ValidationCase("SET_OWNER with a descriptor", .acked) { c in
        let probe = try c.probe()
        #expect(isErrorAck(c.send(.setOwner, fds: [probe.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("SET_LOG_BASE with an 8-byte payload, without its descriptor, past its file's end, or of 0 bytes", .memory) { c in
        let probe = try c.probe(size: 4096)
        #expect(isRefusal(c.send(.setLogBase, payload: LE.u64(4096), fds: [probe.rawValue])), "8 bytes")
        #expect(isRefusal(c.send(.setLogBase, payload: LE.u64(4096) + LE.u64(0))), "no descriptor")
        #expect(isRefusal(c.send(.setLogBase, payload: LE.u64(8192) + LE.u64(0), fds: [probe.rawValue])), "past the end")
        #expect(isRefusal(c.send(.setLogBase, payload: LE.u64(4096) + LE.u64(1), fds: [probe.rawValue])), "past the end by its offset")
        #expect(isRefusal(c.send(.setLogBase, payload: LE.u64(0) + LE.u64(0), fds: [probe.rawValue])), "empty")
        c.frontend.close()
        c.expectProbesClosed()
    },
    ValidationCase("SET_LOG_FD with a descriptor that is not an eventfd, or with two", .memory) { c in
        let probe = try c.probe()
        #expect(isErrorAck(c.send(.setLogFD, fds: [probe.rawValue])))
        let first = try EventFD(), second = try EventFD()
        #expect(isErrorAck(c.send(.setLogFD, fds: [first.rawValue, second.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("SET_BACKEND_REQ_FD (not offered) with a descriptor", .acked) { c in
        let probe = try c.probe()
        #expect(isErrorAck(c.send(.setBackendReqFD, fds: [probe.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("ADD_MEM_REG without a descriptor", .memory) { c in
        #expect(isErrorAck(c.send(.addMemReg, payload: LE.u64(0) + region(0x1000_0000, MiB).bytes)))
    },
    ValidationCase("REM_MEM_REG with 2 descriptors", .memory) { c in
        let first = try c.probe(), second = try c.probe()
        let mapped = Frontend.regions(of: c.memory)[0]
        #expect(isErrorAck(c.send(.remMemReg, payload: LE.u64(0) + mapped.bytes, fds: [first.rawValue, second.rawValue])))
        c.expectProbesClosed()
    },

    // Ring indices and values.
    ValidationCase("ring index 2 * queue pairs and 0xffffffff", .memory) { c in
        let pairs = UInt32(c.served.device.configuration.queuePairs)
        for index in [2 * pairs, 2 * pairs + 1, 0xff, 0xffff_ffff] {
            #expect(isErrorAck(c.send(.setVringNum, payload: Frontend.vringState(index, 256))), "SET_VRING_NUM \(index)")
            #expect(isErrorAck(c.send(.setVringBase, payload: Frontend.vringState(index, 0))), "SET_VRING_BASE \(index)")
            #expect(isErrorAck(c.send(.setVringEnable, payload: Frontend.vringState(index, 1))), "SET_VRING_ENABLE \(index)")
            #expect(isErrorAck(c.send(.setVringAddr, payload: Frontend.vringAddress(index, descriptorTable: 0x7e00_0010_0000, usedRing: 0x7e00_0010_2000, availableRing: 0x7e00_0010_1000))), "SET_VRING_ADDR \(index)")
        }
        let kick = try EventFD()
        #expect(isErrorAck(c.send(.setVringKick, payload: LE.u64(UInt64(2 * pairs)), fds: [kick.rawValue])), "SET_VRING_KICK")
        #expect(isErrorAck(c.send(.setVringCall, payload: LE.u64(UInt64(2 * pairs) | 0x100))), "SET_VRING_CALL")
    },
    ValidationCase("GET_VRING_BASE for ring 2 * queue pairs", .memory) { c in
        let pairs = UInt32(c.served.device.configuration.queuePairs)
        #expect(c.send(.getVringBase, payload: Frontend.vringState(2 * pairs, 0)) == .closed)
    },
    ValidationCase("SET_VRING_NUM 3, 0, 512 (above queue_size 256), 0x10000 and 0x80000000", .memory) { c in
        for num: UInt32 in [3, 0, 100, 512, 0x10000, 0x8000_0000, 0xffff_ffff] {
            #expect(isErrorAck(c.send(.setVringNum, payload: Frontend.vringState(0, num))), "SET_VRING_NUM \(num)")
        }
        for num: UInt32 in [1, 2, 64, 256] {
            #expect(isSuccessAck(c.send(.setVringNum, payload: Frontend.vringState(0, num))), "SET_VRING_NUM \(num) is fine")
        }
    },
    ValidationCase("SET_VRING_BASE 0x10000", .memory) { c in
        #expect(isErrorAck(c.send(.setVringBase, payload: Frontend.vringState(0, 0x10000))))
        #expect(isErrorAck(c.send(.setVringBase, payload: Frontend.vringState(0, 0xffff_ffff))))
        #expect(isSuccessAck(c.send(.setVringBase, payload: Frontend.vringState(0, 0xffff))), "0xffff is a valid index")
    },
    ValidationCase("SET_VRING_ENABLE 2", .memory) { c in
        #expect(isErrorAck(c.send(.setVringEnable, payload: Frontend.vringState(0, 2))))
        #expect(isErrorAck(c.send(.setVringEnable, payload: Frontend.vringState(1, 0xffff_ffff))))
    },

    // Memory tables.
    ValidationCase("SET_MEM_TABLE with 0 regions", .acked) { c in
        #expect(isErrorAck(c.send(.setMemTable, payload: Frontend.memTablePayload([]))))
    },
    ValidationCase("SET_MEM_TABLE with 9 regions", .acked) { c in
        let probe = try c.probe(size: 9 << 20)
        let regions = (0..<9).map { region(0x10_0000 + UInt64($0) * MiB, MiB, offset: UInt64($0) * MiB) }
        #expect(isRefusal(c.send(.setMemTable, payload: Frontend.memTablePayload(regions), fds: Array(repeating: probe.rawValue, count: 9))))
        c.expectProbesClosed()
    },
    ValidationCase("SET_MEM_TABLE claiming 9 regions with 8 described", .acked) { c in
        let probe = try c.probe(size: 8 << 20)
        let regions = (0..<8).map { region(0x10_0000 + UInt64($0) * MiB, MiB, offset: UInt64($0) * MiB) }
        #expect(isRefusal(c.send(.setMemTable, payload: Frontend.memTablePayload(regions, count: 9), fds: Array(repeating: probe.rawValue, count: 8))))
        c.expectProbesClosed()
    },
    ValidationCase("SET_MEM_TABLE with overlapping guest ranges", .acked) { c in
        let first = try c.probe(), second = try c.probe()
        let payload = Frontend.memTablePayload([region(0x10_0000, MiB), region(0x18_0000, MiB, user: 0x7e00_1000_0000)])
        #expect(isErrorAck(c.send(.setMemTable, payload: payload, fds: [first.rawValue, second.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("SET_MEM_TABLE with overlapping frontend addresses", .acked) { c in
        let first = try c.probe(), second = try c.probe()
        let payload = Frontend.memTablePayload([region(0x10_0000, MiB, user: 0x7e00_0000_0000), region(0x100_0000, MiB, user: 0x7e00_0008_0000)])
        #expect(isErrorAck(c.send(.setMemTable, payload: payload, fds: [first.rawValue, second.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("a region of size 0", .acked) { c in
        let probe = try c.probe()
        #expect(isErrorAck(c.send(.setMemTable, payload: Frontend.memTablePayload([region(0x10_0000, 0)]), fds: [probe.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("a region whose mmap_offset + size overflows", .acked) { c in
        let probe = try c.probe()
        let payload = Frontend.memTablePayload([region(0x10_0000, MiB, offset: UInt64.max - 4095)])
        #expect(isErrorAck(c.send(.setMemTable, payload: payload, fds: [probe.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("a region whose guest address + size overflows", .acked) { c in
        let probe = try c.probe()
        let payload = Frontend.memTablePayload([region(UInt64.max - 4095, MiB, user: 0x7e00_0000_0000)])
        #expect(isErrorAck(c.send(.setMemTable, payload: payload, fds: [probe.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("a region whose frontend address + size overflows", .acked) { c in
        let probe = try c.probe()
        let payload = Frontend.memTablePayload([region(0x10_0000, MiB, user: UInt64.max - 4095)])
        #expect(isErrorAck(c.send(.setMemTable, payload: payload, fds: [probe.rawValue])))
        c.expectProbesClosed()
    },
    ValidationCase("a region whose descriptor is not mappable (an eventfd)", .acked) { c in
        let event = try EventFD()
        #expect(isErrorAck(c.send(.setMemTable, payload: Frontend.memTablePayload([region(0x10_0000, MiB)]), fds: [event.rawValue])))
    },
    ValidationCase("ADD_MEM_REG overlapping a mapped region", .memory) { c in
        let probe = try c.probe()
        let mapped = Frontend.regions(of: c.memory)[0]
        let overlapping = region(mapped.guestAddress + 4096, MiB, user: 0x7e00_5000_0000)
        #expect(isErrorAck(c.send(.addMemReg, payload: LE.u64(0) + overlapping.bytes, fds: [probe.rawValue])))
        c.expectProbesClosed()
    },

    // Ring addresses.
    ValidationCase("SET_VRING_ADDR outside memory while the ring runs", .running) { c in
        let start = Frontend.regions(of: c.memory)[0]
        let outside = start.userAddress + start.size + 0x10_0000
        #expect(isErrorAck(c.send(.setVringAddr, payload: Frontend.vringAddress(1, descriptorTable: outside, usedRing: outside + 0x2000, availableRing: outside + 0x1000))))
        #expect(c.frontend.sync(), "the connection stays")
    },
    ValidationCase("SET_VRING_ADDR with guest-physical instead of frontend addresses", .running) { c in
        guard case let .guestPhysical(table, available, used) = c.guest!.transmitQueue(0).rings else { return }
        #expect(isErrorAck(c.send(.setVringAddr, payload: Frontend.vringAddress(1, descriptorTable: table.rawValue, usedRing: used.rawValue, availableRing: available.rawValue))))
    },
    ValidationCase("SET_VRING_ADDR straddling the end of memory", .running) { c in
        let start = Frontend.regions(of: c.memory)[0]
        let end = start.userAddress + start.size
        #expect(isErrorAck(c.send(.setVringAddr, payload: Frontend.vringAddress(1, descriptorTable: end - 1024, usedRing: end - 0x100, availableRing: end - 0x200))))
    },
    ValidationCase("SET_VRING_ADDR with a misaligned descriptor table", .running) { c in
        guard case let .frontendVirtual(table, available, used) = c.guest!.transmitQueue(0).frontendRings else { return }
        #expect(isErrorAck(c.send(.setVringAddr, payload: Frontend.vringAddress(1, descriptorTable: table + 8, usedRing: used, availableRing: available))))
    },
    ValidationCase("SET_VRING_ADDR with unknown flags", .running) { c in
        guard case let .frontendVirtual(table, available, used) = c.guest!.transmitQueue(0).frontendRings else { return }
        #expect(isErrorAck(c.send(.setVringAddr, payload: Frontend.vringAddress(1, flags: 2, descriptorTable: table, usedRing: used, availableRing: available))))
    },
    ValidationCase("a ring with addresses outside memory cannot start", .configured) { c in
        #expect(isSuccessAck(c.send(.setVringAddr, payload: Frontend.vringAddress(1, descriptorTable: 0x10, usedRing: 0x2000, availableRing: 0x1000))),
                "stored while the ring is not enabled")
        #expect(isErrorAck(c.send(.setVringEnable, payload: Frontend.vringState(1, 1))), "the ring cannot start")
        #expect(!c.served.device.runningQueues.contains(1))
    },

    // Headers and requests.
    ValidationCase("header version 0", .acked) { c in
        #expect(c.frontend.exchange(Frontend.Request.getFeatures.rawValue, flags: 0) == .closed)
    },
    ValidationCase("header version 2", .acked) { c in
        #expect(c.frontend.exchange(Frontend.Request.setOwner.rawValue, flags: 2 | Frontend.needReplyFlag) == .closed)
    },
    ValidationCase("header with the reply flag set", .acked) { c in
        #expect(c.frontend.exchange(Frontend.Request.getFeatures.rawValue, flags: Frontend.version | Frontend.replyFlag) == .closed)
    },
    ValidationCase("unknown request 99 with need_reply", .acked) { c in
        #expect(isErrorAck(c.frontend.exchange(99, flags: Frontend.version | Frontend.needReplyFlag)))
        #expect(c.frontend.sync(), "the connection stays")
    },
    ValidationCase("unknown request 0 without REPLY_ACK", .fresh) { c in
        #expect(c.frontend.exchange(0) == .closed)
    },
    ValidationCase("unknown request 0xffffffff without REPLY_ACK", .fresh) { c in
        #expect(c.frontend.exchange(0xffff_ffff, payload: [1, 2, 3]) == .closed)
    },
    ValidationCase("IOTLB_MSG and SET_VRING_ENDIAN (not offered)", .acked) { c in
        #expect(isErrorAck(c.send(.iotlbMessage, payload: [UInt8](repeating: 0, count: 40))))
        #expect(isErrorAck(c.send(.setVringEndian, payload: Frontend.vringState(0, 1))))
        #expect(isErrorAck(c.send(.vringKick, payload: Frontend.vringState(0, 0))))
    },
    ValidationCase("SET_CONFIG (the config space is read-only)", .acked) { c in
        #expect(isErrorAck(c.send(.setConfig, payload: LE.u32(0) + LE.u32(6) + LE.u32(0) + [2, 0, 0, 0, 0, 1])))
        let config = try c.frontend.getConfig()
        #expect(Array(config[0..<6]) == deviceMAC.array)
    },

    // Features.
    ValidationCase("SET_FEATURES with CTRL_VQ, which is not offered", .acked) { c in
        let offered = try c.frontend.getFeatures()
        #expect(isErrorAck(c.send(.setFeatures, payload: LE.u64(offered | 1 << 17))))
    },
    ValidationCase("SET_FEATURES with bit 63", .acked) { c in
        #expect(isErrorAck(c.send(.setFeatures, payload: LE.u64(1 << 32 | 1 << 63))))
    },
    ValidationCase("SET_PROTOCOL_FEATURES with BACKEND_REQ or INBAND_NOTIFICATIONS", .acked) { c in
        typealias P = Frontend.ProtocolFeature
        for bits in [P.backendReq, P.inbandNotifications, 1 << 63] {
            #expect(isErrorAck(c.send(.setProtocolFeatures, payload: LE.u64(P.replyAck | bits))), "0x\(String(bits, radix: 16))")
        }
    },
    ValidationCase("SET_PROTOCOL_FEATURES with unsupported bits without REPLY_ACK", .fresh) { c in
        #expect(c.frontend.exchange(Frontend.Request.setProtocolFeatures.rawValue, payload: LE.u64(Frontend.ProtocolFeature.backendReq)) == .closed)
    },

    ValidationCase("SET_STATUS beyond a byte", .acked) { c in
        #expect(isErrorAck(c.send(.setStatus, payload: LE.u64(0x100))))
        let status = try c.frontend.getStatus()
        #expect(status == 0)
    },

    // MTU.
    ValidationCase("NET_SET_MTU 67 and 65536 are refused, 9000 accepted", .acked) { c in
        #expect(isErrorAck(c.send(.netSetMTU, payload: LE.u64(67))))
        #expect(isErrorAck(c.send(.netSetMTU, payload: LE.u64(65536))))
        #expect(isErrorAck(c.send(.netSetMTU, payload: LE.u64(UInt64.max))))
        let before = try c.frontend.getConfig()
        #expect(LE.u16(before, at: 10) == 1500, "refusals change nothing")
        #expect(isSuccessAck(c.send(.netSetMTU, payload: LE.u64(9000))))
        let after = try c.frontend.getConfig()
        #expect(LE.u16(after, at: 10) == 9000)
        #expect(c.served.device.mtu == 9000)
    },

    // Connections that end in the middle of a message.
    ValidationCase("a header cut short, then the frontend leaves", .fresh) { c in
        try c.frontend.sendRaw([1, 0, 0, 0, 1, 0])
        c.frontend.close()
    },
    ValidationCase("a payload cut short, then the frontend leaves", .acked) { c in
        try c.frontend.sendRaw(Frontend.header(request: 2, flags: 1, size: 8) + [1, 2, 3])
        c.frontend.close()
    },
]

@Suite("vhost-user: malformed and hostile messages are refused, never crash")
struct VhostUserValidationTests {
    /// A region must lie inside its file: the mapping of pages past the end of a memfd succeeds, but
    /// touching them raises SIGBUS, which would kill the daemon when a ring or buffer is put there.
    @Test("A region reaching past the end of its memfd is refused",
          arguments: [
        [MiB + 4096, 0], [2 * MiB, 0], [MiB, MiB], [4096, MiB],
    ] as [[UInt64]])
    func regionBeyondTheFile(sizeAndOffset: [UInt64]) throws {
        let (size, offset) = (sizeAndOffset[0], sizeAndOffset[1])
        let served = try ServedDevice()
        defer { served.stop() }
        let context = try CaseContext(served: served, setup: .acked)
        let probe = try context.probe(size: Int(MiB))
        let payload = Frontend.memTablePayload([region(0x10_0000, size, offset: offset)])
        #expect(isRefusal(context.send(.setMemTable, payload: payload, fds: [probe.rawValue])), "SET_MEM_TABLE")
        let extra = try context.probe(size: Int(MiB))
        let added = region(0x1000_0000, size, user: 0x7e00_4000_0000, offset: offset)
        #expect(isRefusal(context.send(.addMemReg, payload: LE.u64(0) + added.bytes, fds: [extra.rawValue])), "ADD_MEM_REG")
        context.frontend.close()
        context.expectProbesClosed()
    }

    /// A frontend's eventfds are its own: it may hand over a blocking one whose counter is one step
    /// from overflowing, so the device's write of 1 would block for good.
    @Test("A blocking call eventfd filled to its maximum cannot wedge the device")
    func blockingCallEventFD() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        frontend.timeout = 5
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        #expect(roundTrip(guest, sizes: [60]))

        let raw = cvs_eventfd(0, CVS_EFD_CLOEXEC)  // blocking
        try #require(raw >= 0)
        let call = EventFD(adopting: OwnedFileDescriptor(taking: raw))
        var maximum: UInt64 = 0xffff_ffff_ffff_fffe
        #expect(withUnsafeBytes(of: &maximum) { write(raw, $0.baseAddress, 8) } == 8)
        try frontend.setVringCall(1, fd: call.rawValue)
        let transmit = guest.transmitQueue(0)
        transmit.setUsedEvent(transmit.usedIndex)
        #expect(guest.transmit(ethernetFrame(length: 60)))
        guest.kick(1, since: 0, always: true)
        #expect(guest.waitUntil { transmit.usedIndex == transmit.availableIndex }, "the frame was sent")

        // The device must still answer: GET_VRING_BASE stops the ring (joining its worker).
        let outcome = frontend.exchange(Frontend.Request.getVringBase.rawValue, payload: Frontend.vringState(1, 0))
        if case .reply(let reply) = outcome {
            #expect(LE.u32(reply.payload, at: 4) == UInt32(transmit.availableIndex))
        } else {
            Issue.record("GET_VRING_BASE got no reply: the device is wedged (\(outcome))")
        }
        // Unwedge whatever is blocked, so that the test can clean up either way.
        var value: UInt64 = 0
        _ = withUnsafeMutableBytes(of: &value) { read(raw, $0.baseAddress, 8) }
    }

    @Test("Each malformed message is refused; afterwards a new connection to the same service works", arguments: validationCases)
    func refused(_ validationCase: ValidationCase) throws {
        let served = try ServedDevice(queuePairs: 2)
        defer { served.stop() }
        do {
            let context = try CaseContext(served: served, setup: validationCase.setup)
            try validationCase.run(context)
            context.frontend.close()
        }
        #expect(served.device.needsReset == false)
        // The service resets the device and accepts the next frontend, which gets a working device.
        let frontend = try served.connect()
        let memory = try SimulatedGuestMemory()
        let guest = try frontend.negotiate(memory: memory, queuePairs: 2)
        #expect(roundTrip(guest, pair: 0, sizes: [60, 1514]))
        #expect(roundTrip(guest, pair: 1, sizes: [1000]))
        #expect(LE.u16(try frontend.getConfig(), at: 10) == 1500 || validationCase.name.hasPrefix("NET_SET_MTU"))
    }

    @Test("All the malformed messages in a row against one service, while a second device passes traffic throughout")
    func refusedInARowWithABystander() throws {
        let hostile = try ServedDevice(queuePairs: 2)
        defer { hostile.stop() }
        let bystander = try ServedDevice(queuePairs: 2)
        defer { bystander.stop() }
        let bystanderFrontend = try bystander.connect()
        let bystanderGuest = try bystanderFrontend.negotiate(memory: try SimulatedGuestMemory(), queuePairs: 2)
        #expect(roundTrip(bystanderGuest, sizes: [60]))

        for (number, validationCase) in validationCases.enumerated() {
            do {
                let context = try CaseContext(served: hostile, setup: validationCase.setup)
                try validationCase.run(context)
                context.frontend.close()
            } catch {
                Issue.record("\(validationCase.name): \(error)")
            }
            #expect(roundTrip(bystanderGuest, pair: number % 2, sizes: [64 + number], seed: UInt8(number)), "bystander after \(validationCase.name)")
        }
        #expect(bystanderGuest.features & 1 << 32 != 0)
        #expect(bystander.service.connectionCount == 1, "the bystander's frontend stayed connected")
        #expect(hostile.service.connectionCount == validationCases.count)

        let frontend = try hostile.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(), queuePairs: 2)
        #expect(roundTrip(guest, pair: 0, sizes: [60, 1514]))
        #expect(roundTrip(guest, pair: 1, sizes: [60, 1514]))
    }
}
