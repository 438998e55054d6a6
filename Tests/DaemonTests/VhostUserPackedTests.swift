import Testing
import VhostUser
import VirtioNet
import VirtioNetTestSupport

@Suite("vhost-user with packed rings: negotiation, ring positions with wrap counters, restart")
struct VhostUserPackedTests {
    /// A packed ring's vring base as QEMU encodes it when nothing is in flight: the available
    /// position and wrap counter in both halves.
    private func base(of queue: SimulatedQueue) -> UInt32 {
        let half = UInt32(queue.nextAvailablePosition) | (queue.availableWrap ? 0x8000 : 0)
        return half | half << 16
    }

    @Test("RING_PACKED is offered; frames cross rings of 8 for many laps; GET_VRING_BASE gives both positions with their wrap counters and the ring resumes there")
    func packedRingsLapAndResume() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        #expect(try frontend.getFeatures() & VirtioNetFeatures.ringPacked.rawValue != 0)
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(), queueSize: 8, packed: true)
        #expect(guest.queues.allSatisfy { $0.layout == .packed })
        for round in 0..<7 { #expect(roundTrip(guest, sizes: [60, 1514, 333], seed: UInt8(round * 3))) }
        let transmit = guest.transmitQueue(0), receive = guest.receiveQueue(0)
        // 21 slots used on each ring of 8: position 5 of the third lap (wrap counter 1 again).
        let transmitBase = try frontend.getVringBase(1), receiveBase = try frontend.getVringBase(0)
        #expect(transmitBase.base == base(of: transmit) && transmitBase.base == 0x8005_8005, "TX: 0x\(String(transmitBase.base, radix: 16))")
        #expect(receiveBase.base == base(of: receive), "RX: 0x\(String(receiveBase.base, radix: 16))")

        try frontend.setVringBase(1, transmitBase.base)
        try frontend.setVringBase(0, receiveBase.base)
        try frontend.sendKick(0, of: guest)
        try frontend.sendKick(1, of: guest)
        for round in 0..<3 { #expect(roundTrip(guest, sizes: [70, 900], seed: UInt8(100 + round))) }
        #expect(try frontend.getVringBase(1).base == base(of: transmit))
    }

    @Test("DPDK's 16-bit packed base (available position and wrap counter only) starts the ring there")
    func dpdkSixteenBitBase() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(), queueSize: 8, packed: true)
        for round in 0..<3 { #expect(roundTrip(guest, sizes: [60, 61, 62], seed: UInt8(round))) }
        let transmit = guest.transmitQueue(0), receive = guest.receiveQueue(0)
        _ = try frontend.getVringBase(0)
        _ = try frontend.getVringBase(1)
        // As DPDK's virtio-user sends it: bits 0-15 only.
        try frontend.setVringBase(1, base(of: transmit) & 0xffff)
        try frontend.setVringBase(0, base(of: receive) & 0xffff)
        try frontend.sendKick(0, of: guest)
        try frontend.sendKick(1, of: guest)
        #expect(roundTrip(guest, sizes: [100, 1500, 64, 65], seed: 40))
    }

    @Test("Bases that cannot be: beyond 16 bits for a split ring, a position past a packed ring; the connection goes on")
    func impossibleBases() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        #expect(roundTrip(guest, sizes: [60]))
        _ = try frontend.getVringBase(1)
        #expect(throws: (any Error).self) { try frontend.setVringBase(1, 0x1_0001) }
        try frontend.setVringBase(1, 1)
        try frontend.sendKick(1, of: guest)
        #expect(roundTrip(guest, sizes: [61]))
        frontend.close()

        let packedFrontend = try served.connect()
        let packed = try packedFrontend.negotiate(memory: try SimulatedGuestMemory(), queueSize: 8, packed: true)
        #expect(roundTrip(packed, sizes: [62]))
        _ = try packedFrontend.getVringBase(1)
        for bad: UInt32 in [0x8008, 0x0008_8001, 0xffff_ffff] {
            #expect(throws: (any Error).self, "0x\(String(bad, radix: 16))") { try packedFrontend.setVringBase(1, bad) }
        }
        try packedFrontend.setVringBase(1, 0x8001_8001)
        try packedFrontend.sendKick(1, of: packed)
        #expect(roundTrip(packed, sizes: [63]))
    }
}
