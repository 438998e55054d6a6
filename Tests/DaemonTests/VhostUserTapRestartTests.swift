#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NetworkTestSupport
import Sys
import Testing
import VhostUser
import VirtioNet
import VirtioNetTestSupport

/// A change to one ring once stopped and restarted the whole device, and the restart acknowledged the
/// features again, which detached TAP queues 1..N-1 (TUNSETQUEUE): the kernel drops what waits in a
/// detached queue. Now only the changed ring's queue pair restarts, and the TAP is not touched.
@Suite("vhost-user on a multiqueue TAP: restarting one ring keeps what waits in the other queues",
       .enabled(if: getuid() == 0 && FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip"), "needs root and iproute2"))
struct VhostUserTapRestartTests {
    static let guestMAC = MACAddress(0x52, 0x54, 0x00, 0xc0, 0xc0, 0x11)
    static let guestIPv4: [UInt8] = [198, 18, 0, 1]
    static let peerMAC: [UInt8] = [0x52, 0x54, 0x00, 0xc0, 0xc0, 0x12]

    @Test("Frames queued in TAP queue 1 while the guest posts no buffers there survive a new call eventfd on ring 0")
    func queuedFramesSurviveARestart() async throws {
        let configuration = BridgedPeer.Configuration(
            peerMAC: Self.peerMAC, peerIPv4: "198.18.0.2/24", neighbours: [.init(ip: "198.18.0.1", mac: Self.guestMAC.array)])
        try await BridgedPeer.with(configuration) { network in
            let tapName = String("vur\(getpid() % 100_000)-\(UInt16.random(in: 0...UInt16.max))".prefix(15))
            let backend = try await network.bridgeSide.run { try TapBackend(name: tapName, queuePairs: 2) }
            try backend.setMTU(1500)
            try network.attach(tapName)
            let device = try NetDevice(configuration: NetConfiguration(mac: Self.guestMAC, mtu: 1500, queuePairs: 2), backend: backend, logger: quietLogger)
            let directory = try TemporaryDirectory("vu-tap")
            defer { directory.remove() }
            let service = try VhostUserService(path: directory.path + "/vhost.sock", mode: .server, device: device, logger: quietLogger)
            try service.start()
            defer { service.stop() }
            let frontend = try Frontend.connect(path: service.path)
            defer { frontend.close() }
            let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(), queuePairs: 2)
            // Pair 0 receives; pair 1 has no buffers, so its worker leaves TAP queue 1 alone.
            guest.postReceiveBuffers(pair: 0, count: 256)

            // 64 flows from B: the TAP spreads them over both queues by their hash.
            let frames = (0..<64).map { flow in
                Packet.udpFrame(sourceMAC: Self.peerMAC, destinationMAC: Self.guestMAC.array,
                                .v4(source: [198, 18, 0, 2], destination: Self.guestIPv4),
                                sourcePort: UInt16(40000 + flow), destinationPort: 9, payload: Packet.pattern(count: 100, seed: UInt8(flow)))
            }
            let peerInterface = network.peerInterface
            try await network.peer.run {
                let socket = try TestSocket.packet(interface: peerInterface)
                for frame in frames { try socket.sendFrame(frame) }
            }
            // Pair 1's worker does not read queue 1 while the guest has no buffers there: frames of
            // the flows that hash to queue 1 wait in it (at least one, once it is readable).
            let queue = backend.descriptor(queue: 1)
            let waiting = eventually { (try? waitReadable([queue], timeoutMilliseconds: 0)) == [true] }
            #expect(waiting, "some of the 64 flows hashed to TAP queue 1 and wait there")

            // A ring change that has nothing to do with pair 1: a new call eventfd for ring 0.
            let call = try EventFD()
            try frontend.setVringCall(0, fd: call.rawValue)

            // Buffers for pair 1 now: every frame that waited in queue 1 must come.
            guest.postReceiveBuffers(pair: 1, count: 256)
            var received = 0, onPairOne = 0
            guest.waitUntil(timeout: 10) {
                received += guest.receivedFrames(pair: 0).count
                onPairOne += guest.receivedFrames(pair: 1).count
                return received + onPairOne >= 64
            }
            #expect(received + onPairOne == 64, "pair 0 got \(received), pair 1 got \(onPairOne) of 64")
        }
    }
}
