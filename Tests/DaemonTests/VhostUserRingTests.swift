import Foundation
import GuestMemory
import Sys
import Testing
import VhostUser
import VirtioNet
import VirtioNetTestSupport

/// How long something that must not happen is given to happen anyway. It can only make a test
/// pass wrongly (never fail wrongly); what decides each step is a reply or an event with a deadline.
private let quietPeriod = 0.2

@Suite("vhost-user: ring lifecycle and memory changes")
struct VhostUserRingTests {
    @Test("With protocol features, rings run only after SET_VRING_ENABLE 1")
    func ringsWaitForEnable() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(), enable: false)
        let frame = ethernetFrame(length: 100)
        guest.postReceiveBuffers(count: 4)
        #expect(guest.transmit(frame))
        #expect(frontend.sync())
        #expect(!served.device.isActive, "nothing runs before SET_VRING_ENABLE")
        #expect(guest.holds(for: quietPeriod) { guest.transmitQueue(0).usedIndex == 0 }, "the frame is not consumed")

        // Enabling RX alone does not run TX.
        try frontend.setVringEnable(0, true)
        #expect(guest.holds(for: quietPeriod) { guest.transmitQueue(0).usedIndex == 0 })
        try frontend.setVringEnable(1, true)
        guest.kick(1, since: 0, always: true)
        #expect(guest.waitUntil { guest.transmitQueue(0).usedIndex == 1 }, "consumed once enabled")
        #expect(guest.receive(count: 1) == [frame])

        // SET_VRING_ENABLE 0 stops the ring again.
        try frontend.setVringEnable(1, false)
        #expect(guest.transmit(ethernetFrame(length: 70)))
        #expect(guest.holds(for: quietPeriod) { guest.transmitQueue(0).usedIndex == 1 })
        try frontend.setVringEnable(1, true)
        guest.kick(1, since: 0, always: true)
        #expect(guest.waitUntil { guest.transmitQueue(0).usedIndex == 2 })
    }

    @Test("Without protocol features, rings start enabled and SET_VRING_ENABLE is refused")
    func withoutProtocolFeatures() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(), protocolFeatures: nil)
        #expect(frontend.acknowledgedFeatures & Frontend.protocolFeaturesBit == 0)
        #expect(!frontend.replyAck)
        #expect(frontend.sync())
        #expect(served.device.isActive, "rings run as soon as they are set up")
        #expect(roundTrip(guest, sizes: [60, 1514]))
        // Without REPLY_ACK the only way to refuse is to close the connection.
        let outcome = frontend.exchange(Frontend.Request.setVringEnable.rawValue, payload: Frontend.vringState(0, 1))
        #expect(outcome == .closed)
        #expect(eventually { !served.device.isActive }, "the device is reset when the frontend goes")
    }

    @Test("GET_VRING_BASE stops the ring and returns where it stopped; SET_VRING_BASE and a new kick resume it")
    func getVringBaseStopsAndResumes() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        let transmit = guest.transmitQueue(0)
        #expect(roundTrip(guest, sizes: [60, 200, 1514]))
        #expect(transmit.usedIndex == 3)

        let base = try frontend.getVringBase(1)
        #expect(base.index == 1 && base.base == 3, "TX stopped after 3 frames")
        // The RX ring took 3 buffers; any it had looked at ahead are given back.
        let receiveBase = try frontend.getVringBase(0)
        #expect(receiveBase.index == 0 && receiveBase.base == 3, "RX stopped after 3 buffers")

        // Stopped: a new frame and a kick on the old descriptor do nothing.
        let frame = ethernetFrame(length: 333, seed: 9)
        #expect(guest.transmit(frame))
        guest.kick(1, since: 0, always: true)
        #expect(guest.holds(for: quietPeriod) { transmit.usedIndex == 3 })
        // Still stopped after SET_VRING_BASE and SET_VRING_ENABLE: only a new kick descriptor starts it.
        try frontend.setVringBase(1, base.base)
        try frontend.setVringBase(0, receiveBase.base)
        try frontend.setVringEnable(1, true)
        #expect(guest.holds(for: quietPeriod) { transmit.usedIndex == 3 })
        #expect(served.device.runningQueues.isEmpty)

        guest.postReceiveBuffers(count: 1)
        try frontend.sendKick(0, of: guest)
        try frontend.sendKick(1, of: guest)
        guest.kick(1, since: 0, always: true)
        guest.kick(0, since: 0, always: true)
        #expect(guest.waitUntil { transmit.usedIndex == 4 }, "resumed at the 4th frame")
        #expect(guest.receive(count: 1) == [frame])
        #expect(try frontend.getVringBase(1).base == 4)
    }

    @Test("SET_VRING_BASE resumes a ring at a given index")
    func setVringBaseSkipsAhead() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let memory = try SimulatedGuestMemory()
        let guest = try frontend.negotiate(memory: memory)
        #expect(roundTrip(guest, sizes: [64]))
        #expect(try frontend.getVringBase(1).base == 1)
        // Two frames are made available; the ring is told to resume after the first one (as if it
        // had been consumed elsewhere): only the second is sent.
        let first = ethernetFrame(length: 80, seed: 1), second = ethernetFrame(length: 90, seed: 2)
        #expect(guest.transmit(first))
        #expect(guest.transmit(second))
        try frontend.setVringBase(1, 2)
        guest.postReceiveBuffers(count: 2)
        try frontend.sendKick(1, of: guest)
        guest.kick(1, since: 0, always: true)
        #expect(guest.receive(count: 1) == [second])
        #expect(guest.holds(for: quietPeriod) { guest.receivedFrames().isEmpty })
    }

    @Test("A new SET_MEM_TABLE while rings run restarts them and traffic continues")
    func setMemTableAgain() throws {
        let served = try ServedDevice(queuePairs: 2)
        defer { served.stop() }
        let frontend = try served.connect()
        let memory = try SimulatedGuestMemory(regionSize: 8 << 20, regionCount: 2)
        let guest = try frontend.negotiate(memory: memory, queuePairs: 2)
        #expect(roundTrip(guest, pair: 0, sizes: [60, 1514]))
        #expect(roundTrip(guest, pair: 1, sizes: [61]))
        for round in 0..<3 {
            try frontend.setMemTable(Frontend.regions(of: memory), fds: memory.fds)
            #expect(served.device.isActive)
            #expect(roundTrip(guest, pair: 0, sizes: [60, 700, 1514], seed: UInt8(round * 10)))
            #expect(roundTrip(guest, pair: 1, sizes: [90, 1200], seed: UInt8(round * 10 + 5)))
        }
    }

    @Test("QEMU 7.2's repeats are harmless: ADD_MEM_REG of a mapped region and REM_MEM_REG of an unmapped one change nothing")
    func repeatedRegionMessages() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let memory = try SimulatedGuestMemory(regionSize: 4 << 20)
        let guest = try frontend.negotiate(memory: memory)
        let mapped = Frontend.regions(of: memory)[0]
        try frontend.addMemoryRegion(mapped, fd: memory.fds[0])
        try frontend.addMemoryRegion(mapped, fd: memory.fds[0])
        #expect(roundTrip(guest, sizes: [60, 1514]))
        try frontend.removeMemoryRegion(Frontend.Region(guestAddress: 0x4000_0000, size: 1 << 20, userAddress: 0x7e00_4000_0000))
        #expect(roundTrip(guest, sizes: [61, 1513]))
    }

    @Test("SEND_RARP announces the MAC address out of the backend (here: back to the guest)")
    func sendRARP() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        guest.postReceiveBuffers(count: 2)
        let mac = MACAddress(0x52, 0x54, 0x00, 0xab, 0xcd, 0xef)
        try frontend.call(.sendRARP, payload: mac.array + [0, 0])
        let frames = guest.receive(count: 1)
        #expect(frames.count == 1)
        if let frame = frames.first {
            #expect(frame.count == 60)
            #expect(Array(frame[0..<6]) == MACAddress.broadcast.array)
            #expect(Array(frame[6..<12]) == mac.array)
            #expect(Array(frame[12..<14]) == [0x80, 0x35], "RARP")
            #expect(Array(frame[22..<28]) == mac.array, "sender hardware address")
            #expect(Array(frame[32..<38]) == mac.array, "target hardware address")
        }
    }

    @Test("SEND_RARP's frame is sent by the worker that owns queue pair 0, never by the connection thread")
    func sendRARPFromTheOwningWorker() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let backend = try SenderRecordingBackend()
        let device = try NetDevice(configuration: NetConfiguration(mac: deviceMAC), backend: backend, logger: quietLogger)
        let service = try VhostUserService(path: directory.path + "/vhost.sock", mode: .server, device: device, logger: quietLogger)
        try service.start()
        defer { service.stop() }
        let frontend = try Frontend.connect(path: service.path)
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        guest.postReceiveBuffers(count: 2)
        try frontend.call(.sendRARP, payload: deviceMAC.array + [0, 0])
        #expect(guest.receive(count: 1).first.map { Array($0[12..<14]) } == [0x80, 0x35], "RARP")
        #expect(backend.senders == ["vnet-qp0"])
    }

    @Test("ADD_MEM_REG adds a region the rings use at once; REM_MEM_REG removes it and traffic continues")
    func addAndRemoveMemoryRegion() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let memory = try SimulatedGuestMemory(regionSize: 4 << 20)
        let guest = try frontend.negotiate(memory: memory)
        #expect(roundTrip(guest, sizes: [60]))

        // A second memfd region right after the first, in guest and frontend address space.
        let size = 1 << 20
        let extra = try MemFD.create(name: "vu-extra-region", size: size)
        let mapping = try MemoryMapping(fd: extra.rawValue, offset: 0, length: size)
        let region = Frontend.Region(guestAddress: memory.end, size: UInt64(size), userAddress: memory.end + 0x7f00_0000_0000)
        try frontend.addMemoryRegion(region, fd: extra.rawValue)

        // A frame whose buffer lies in the new region round-trips.
        let frame = ethernetFrame(length: 400, seed: 77)
        let bytes = [UInt8](repeating: 0, count: 12) + frame
        bytes.withUnsafeBytes { mapping.base.advanced(by: 4096).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        guest.postReceiveBuffers(count: 1)
        #expect(guest.transmit(at: GuestAddress(memory.end + 4096), length: UInt32(bytes.count)))
        #expect(guest.receive(count: 1) == [frame])
        _ = guest.completedTransmits()

        try frontend.removeMemoryRegion(region)
        #expect(roundTrip(guest, sizes: [60, 1514], seed: 3))
        // The removed region is no longer guest memory: a chain pointing there is returned unused.
        let dropsBefore = served.device.queuePairCounters[0].transmit.dropped(.badChain)
        guest.postReceiveBuffers(count: 1)
        #expect(guest.transmit(at: GuestAddress(memory.end + 4096), length: UInt32(bytes.count)))
        #expect(guest.waitUntil { guest.transmitQueue(0).usedIndex == guest.transmitQueue(0).availableIndex })
        #expect(served.device.queuePairCounters[0].transmit.dropped(.badChain) == dropsBefore + 1)
        #expect(guest.holds(for: quietPeriod) { guest.receivedFrames().isEmpty })
        #expect(roundTrip(guest, sizes: [100], seed: 4))
        #expect(!served.device.needsReset)
    }
    @Test("A SET_MEM_TABLE that no longer covers the rings is refused; the next one that does brings them back")
    func memoryWithoutTheRings() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let memory = try SimulatedGuestMemory(regionSize: 4 << 20, regionCount: 2)
        let guest = try frontend.negotiate(memory: memory)
        #expect(roundTrip(guest, sizes: [60]))
        let regions = Frontend.regions(of: memory)
        // Only the second region: the rings (at the start of the first) are outside memory now.
        let outcome = frontend.exchange(Frontend.Request.setMemTable.rawValue, flags: Frontend.version | Frontend.needReplyFlag,
                                        payload: Frontend.memTablePayload([regions[1]]), fds: [memory.fds[1]])
        #expect(isErrorAck(outcome), "the rings cannot start: \(outcome)")
        #expect(served.device.runningQueues.isEmpty)
        try frontend.setMemTable(regions, fds: memory.fds)
        #expect(served.device.runningQueues == [0, 1])
        guest.kick(0, since: 0, always: true)
        #expect(roundTrip(guest, sizes: [60, 1514], seed: 5))
    }

    @Test("ADD_MEM_REG up to GET_MAX_MEM_SLOTS regions; one more is refused")
    func memorySlotLimit() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        try frontend.setFeatures(try frontend.getFeatures())
        try frontend.setProtocolFeatures(Frontend.defaultProtocolFeatures)
        let slots = try frontend.getMaxMemSlots()
        var probes: [ProbeFD] = []
        for slot in 0..<slots {
            let probe = try ProbeFD(size: 4096)
            probes.append(probe)
            try frontend.addMemoryRegion(Frontend.Region(guestAddress: 0x10_0000 + slot * 0x10000, size: 4096, userAddress: 0x7e00_0010_0000 + slot * 0x10000), fd: probe.rawValue)
            probe.closeOwn()  // the backend keeps a mapping, not the descriptor
        }
        let extra = try ProbeFD(size: 4096)
        let outcome = frontend.exchange(Frontend.Request.addMemReg.rawValue, flags: Frontend.version | Frontend.needReplyFlag,
                                        payload: LE.u64(0) + Frontend.Region(guestAddress: 0x1000_0000, size: 4096, userAddress: 0x7e00_1000_0000).bytes,
                                        fds: [extra.rawValue])
        #expect(isErrorAck(outcome), "slot \(slots + 1): \(outcome)")
        // Removing one makes room again.
        try frontend.removeMemoryRegion(Frontend.Region(guestAddress: 0x10_0000, size: 4096, userAddress: 0x7e00_0010_0000))
        try frontend.addMemoryRegion(Frontend.Region(guestAddress: 0x1000_0000, size: 4096, userAddress: 0x7e00_1000_0000), fd: extra.rawValue)
    }

    @Test("The backend keeps mappings, not descriptors, and unmaps the memory when the frontend leaves")
    func memoryIsReleased() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let probe = try ProbeFD(size: 4 << 20)
        try frontend.setFeatures(try frontend.getFeatures())
        try frontend.setProtocolFeatures(Frontend.defaultProtocolFeatures)
        try frontend.setMemTable([Frontend.Region(guestAddress: 0x10_0000, size: 4 << 20, userAddress: 0x7e00_0010_0000)], fds: [probe.rawValue])
        probe.closeOwn()
        #expect(eventually { probe.openCopies == 0 }, "the received descriptor was closed after mapping")
        #expect(mappings(of: probe.name) > 0, "the region is mapped")
        // A second table replaces the first: the old mapping goes.
        let second = try ProbeFD(size: 4 << 20)
        try frontend.setMemTable([Frontend.Region(guestAddress: 0x10_0000, size: 4 << 20, userAddress: 0x7e00_0010_0000)], fds: [second.rawValue])
        #expect(eventually { mappings(of: probe.name) == 0 }, "the replaced table is unmapped")
        second.closeOwn()
        frontend.close()
        #expect(eventually { mappings(of: second.name) == 0 && second.openCopies == 0 }, "unmapped when the frontend left")
    }

    @Test("mappings(of:) sees every mapping of a file however long /proc/self/maps is (Foundation reads only its first 4 KiB)")
    func mappingsAreCountedInAllOfProcMaps() throws {
        // 64 more lines in /proc/self/maps: most of them lie past its first 4 KiB.
        let probes = try (0..<64).map { _ in try ProbeFD(size: 4096) }
        var mapped: [MemoryMapping]? = try probes.map { try MemoryMapping(fd: $0.rawValue, offset: 0, length: 4096) }
        #expect(mapped?.count == 64)
        #expect(probes.filter { mappings(of: $0.name) != 1 }.isEmpty, "mappings not found: \(probes.filter { mappings(of: $0.name) != 1 }.count) of 64")
        mapped = nil
        #expect(probes.allSatisfy { mappings(of: $0.name) == 0 }, "unmapped")
    }

    @Test("RESET_DEVICE and RESET_OWNER stop the rings; negotiation on the same connection starts again",
          arguments: [Frontend.Request.resetDevice, .resetOwner])
    func resetDevice(_ request: Frontend.Request) throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        #expect(roundTrip(guest, sizes: [60]))
        try frontend.setStatus(0x0f)
        // As QEMU sends it: without need_reply.
        try frontend.send(request.rawValue)
        #expect(frontend.sync())
        #expect(!served.device.isActive)
        #expect(try frontend.getStatus() == 0)
        // The backend forgot the protocol features too; this frontend negotiates them again.
        frontend.assumeProtocolFeatures(0)
        let again = try frontend.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
        #expect(roundTrip(again, sizes: [60, 1514], seed: 8))
    }

    @Test("RESET_DEVICE with need_reply is acknowledged, and REPLY_ACK still holds after it (QEMU negotiates protocol features once per connection)")
    func resetDeviceKeepsReplyAck() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        #expect(roundTrip(guest, sizes: [60]))
        frontend.timeout = 2
        let reset = frontend.exchange(Frontend.Request.resetDevice.rawValue, flags: Frontend.version | Frontend.needReplyFlag)
        #expect(isSuccessAck(reset), "RESET_DEVICE with need_reply: \(reset)")
        #expect(!served.device.isActive)
        let owner = frontend.exchange(Frontend.Request.setOwner.rawValue, flags: Frontend.version | Frontend.needReplyFlag)
        #expect(isSuccessAck(owner), "SET_OWNER with need_reply after the reset: \(owner)")
    }

    @Test("QEMU's order: SET_VRING_ENABLE right after SET_PROTOCOL_FEATURES, before SET_FEATURES and the rings")
    func enableBeforeFeatures() throws {
        let served = try ServedDevice(queuePairs: 2)
        defer { served.stop() }
        let frontend = try served.connect()
        let offered = try frontend.getFeatures() & ~VirtioNetFeatures.ringPacked.rawValue
        try frontend.setProtocolFeatures(try frontend.getProtocolFeatures() & Frontend.defaultProtocolFeatures)
        #expect(try frontend.getQueueNum() == 2)
        for ring in 0..<4 { try frontend.setVringEnable(UInt32(ring), true) }
        try frontend.setOwner()
        try frontend.setFeatures(offered)
        let memory = try SimulatedGuestMemory()
        try frontend.setMemTable(Frontend.regions(of: memory), fds: memory.fds)
        let guest = try SimulatedVhostUserGuest(memory: memory, queuePairs: 2, queueSize: 256, features: offered)
        for ring in 0..<4 { try frontend.startRing(ring, of: guest, base: 0) }
        #expect(served.device.isActive)
        #expect(roundTrip(guest, pair: 0, sizes: [60, 1514]))
        #expect(roundTrip(guest, pair: 1, sizes: [61, 1513]))
    }

    @Test("Only the first pair's rings set up on an MQ device: that pair works")
    func firstPairOnly() throws {
        let served = try ServedDevice(queuePairs: 4)
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(), queuePairs: 4, rings: [0, 1])
        #expect(served.device.isActive)
        #expect(roundTrip(guest, pair: 0, sizes: [60, 700, 1514]))
        #expect(served.backend.activeQueuePairs == 1)
    }

    @Test("A ring the guest breaks shows as DEVICE_NEEDS_RESET in GET_STATUS; the next frontend gets a clean device")
    func brokenRingIsReported() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        #expect(roundTrip(guest, sizes: [60]))
        try frontend.setStatus(0x0f)
        #expect(try frontend.getStatus() == 0x0f)
        // The available index jumps past the ring size: the device must stop trusting the ring.
        let transmit = guest.transmitQueue(0)
        transmit.setAvailableIndex(transmit.availableIndex &+ 300)
        guest.kick(1, since: 0, always: true)
        #expect(eventually { served.device.needsReset }, "the device noticed")
        #expect(try frontend.getStatus() == 0x4f, "DEVICE_NEEDS_RESET (0x40) is reported")
        frontend.close()
        #expect(eventually { !served.device.needsReset && !served.device.isActive })
        let next = try served.connect()
        let nextGuest = try next.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
        #expect(try next.getStatus() == 0)
        #expect(roundTrip(nextGuest, sizes: [60, 1514]))
    }

    @Test("Server mode serves one frontend at a time: a second one is closed at once, and the next one after the first leaves is served")
    func secondFrontendIsClosed() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let first = try served.connect()
        let guest = try first.negotiate(memory: try SimulatedGuestMemory())
        let second = try served.connect()
        try? second.send(Frontend.Request.getQueueNum.rawValue)
        #expect(second.readReply(timeout: 10) == .closed, "not served while the first is connected, and told so")
        #expect(roundTrip(guest, sizes: [60]), "the first is unaffected")
        first.close()
        let third = try served.connect()
        #expect(try third.getQueueNum() == 1)
        let thirdGuest = try third.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
        #expect(roundTrip(thirdGuest, sizes: [100]))
    }
}

/// Mappings of this process whose file name contains `name` (/proc/self/maps).
func mappings(of name: String) -> Int {
    guard let maps = readProcFile("/proc/self/maps") else { return -1 }
    return maps.split(separator: "\n").filter { $0.contains(name + " ") || $0.hasSuffix(name) }.count
}

