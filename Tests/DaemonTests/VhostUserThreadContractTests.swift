#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Testing
import VhostUser
import VirtioNet
import VirtioNetTestSupport

/// PacketBackend's contract: "Per-queue calls are made only by the one worker that owns that queue
/// pair; configuration calls may come from another thread." Backends may rely on it (SinkBackend's
/// counters do); these tests hold the vhost-user layer to it.
@Suite("vhost-user: per-queue backend calls come only from that queue pair's worker")
struct VhostUserThreadContractTests {
    /// A device on a contract-checking backend behind a vhost-user service, with a frontend that
    /// negotiated one queue pair. The MAC gives the service thread a name of its own ("vhost-c0:01").
    private final class Served {
        let violations = Violations()
        let backend: ContractCheckingBackend
        let device: NetDevice
        let directory: TemporaryDirectory
        let service: VhostUserService
        let frontend: Frontend
        let guest: SimulatedVhostUserGuest

        init(checkRARP: Bool) throws {
            backend = try ContractCheckingBackend(queuePairs: 1, violations: violations, checkRARP: checkRARP)
            device = try NetDevice(configuration: NetConfiguration(mac: MACAddress(0x52, 0x54, 0x00, 0xc0, 0xc0, 0x01), mtu: 1500, queuePairs: 1),
                                   backend: backend, logger: quietLogger)
            directory = try TemporaryDirectory("vu-contract")
            service = try VhostUserService(path: directory.path + "/vhost.sock", mode: .server, device: device, logger: quietLogger)
            try service.start()
            frontend = try Frontend.connect(path: service.path)
            guest = try frontend.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
        }

        func stop() {
            frontend.close()
            service.stop()
            directory.remove()
        }
    }

    @Test("The checking backend notices a per-queue call from a thread that is not the queue pair's worker")
    func checkerNoticesOtherThreads() throws {
        let violations = Violations()
        let backend = try ContractCheckingBackend(queuePairs: 1, violations: violations)
        var byte: UInt8 = 0
        let outcome = withUnsafeMutableBytes(of: &byte) { buffer in
            var vector = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
            return withUnsafePointer(to: &vector) { backend.receive(queue: 0, into: UnsafeBufferPointer(start: $0, count: 1)) }
        }
        #expect(outcome == .empty)
        #expect(violations.report.contains("PacketBackend.receive(queue: 0) called from thread"), "\(violations.report)")
    }

    @Test("Frames through a running device reach the backend only from the queue pair's worker")
    func trafficFromTheWorker() throws {
        let served = try Served(checkRARP: true)
        defer { served.stop() }
        #expect(roundTrip(served.guest, sizes: [60, 700, 1514]))
        #expect(served.violations.isEmpty, "\(served.violations.report)")
    }

    @Test("SEND_RARP while queue 0 runs hands the RARP frame to the backend from queue 0's worker, not the connection thread")
    func rarpFromTheWorker() throws {
        let served = try Served(checkRARP: true)
        defer { served.stop() }
        served.guest.postReceiveBuffers(count: 4)
        #expect(served.device.isActive)
        try served.frontend.call(.sendRARP, payload: MACAddress(0x52, 0x54, 0x00, 0xc0, 0xc0, 0x02).array + [0, 0])
        let frames = served.guest.receive(count: 1)
        #expect(frames.count == 1 && frames.first.map { Array($0[12..<14]) } == [0x80, 0x35], "the RARP frame came back")
        #expect(served.violations.isEmpty, "\(served.violations.report)")
    }
}
