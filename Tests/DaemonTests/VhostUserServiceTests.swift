#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Sys
import Testing
import VhostUser
import VirtioNet
import VirtioNetTestSupport

@Suite("vhost-user: server and client modes, reconnection")
struct VhostUserServiceTests {
    @Test("Server mode: frontend A passes traffic and leaves, the device is reset, frontend B passes traffic")
    func serverModeReconnect() throws {
        let served = try ServedDevice(queuePairs: 2)
        defer { served.stop() }

        let first = try served.connect()
        let firstGuest = try first.negotiate(memory: try SimulatedGuestMemory(), queuePairs: 2)
        #expect(roundTrip(firstGuest, pair: 0, sizes: [60, 1514]))
        #expect(roundTrip(firstGuest, pair: 1, sizes: [128]))
        #expect(served.device.isActive)
        first.close()
        #expect(eventually { !served.device.isActive }, "the device is reset when frontend A leaves")
        #expect(served.device.negotiatedFeatures == nil)

        // B uses different memory (another memfd, other addresses) and starts from ring index 0.
        let second = try served.connect()
        let memory = try SimulatedGuestMemory(regionSize: 2 << 20, regionCount: 3, base: GuestAddress(0x4000_0000), userAddressOffset: 0x7a00_0000_0000)
        let secondGuest = try second.negotiate(memory: memory, queuePairs: 2)
        #expect(roundTrip(secondGuest, pair: 0, sizes: [60, 1000, 1514], seed: 40))
        #expect(roundTrip(secondGuest, pair: 1, sizes: [70, 1400], seed: 80))
        #expect(served.service.connectionCount == 2)
        second.close()
        #expect(eventually { !served.device.isActive })
    }

    @Test("Server mode: a frontend that leaves without a word, mid-negotiation, does not stop the next one")
    func serverModeAbandonedNegotiation() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        for step in 0..<4 {
            let frontend = try served.connect()
            let memory = try SimulatedGuestMemory(regionSize: 2 << 20)
            _ = try frontend.getFeatures()
            if step >= 1 { try frontend.setFeatures(try frontend.getFeatures() | Frontend.protocolFeaturesBit) }
            if step >= 2 { try frontend.setMemTable(Frontend.regions(of: memory), fds: memory.fds) }
            if step >= 3 { _ = try frontend.negotiate(memory: memory) }
            frontend.close()
        }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        #expect(roundTrip(guest, sizes: [60, 1514]))
        #expect(served.service.connectionCount == 5)
    }

    @Test("Server mode: the device's MTU after a frontend set another with NET_SET_MTU is the configured one again for the next frontend")
    func mtuIsResetForTheNextFrontend() throws {
        let served = try ServedDevice(mtu: 1500)
        defer { served.stop() }
        let first = try served.connect()
        try first.setProtocolFeatures(Frontend.ProtocolFeature.replyAck | Frontend.ProtocolFeature.netMTU)
        try first.netSetMTU(9000)
        #expect(LE.u16(try first.getConfig(), at: 10) == 9000)
        first.close()
        #expect(eventually { served.service.connectionCount == 1 && !served.device.isActive })
        let second = try served.connect()
        try second.setProtocolFeatures(Frontend.ProtocolFeature.replyAck)
        #expect(LE.u16(try second.getConfig(), at: 10) == 1500, "the first frontend's MTU leaked into the second's device")
    }

    @Test("Client mode: the service connects to the VMM's socket, and connects again after the VMM closes it")
    func clientModeReconnects() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/vmm.sock"
        let listener = try UnixSocket.listen(path: path)
        let backend = try LoopbackBackend(queuePairs: 1)
        let device = try NetDevice(configuration: NetConfiguration(mac: deviceMAC, queuePairs: 1, maximumQueueSize: 256), backend: backend, logger: quietLogger)
        let service = try VhostUserService(path: path, mode: .client, device: device, logger: quietLogger)
        try service.start()
        defer { service.stop() }

        func accept() throws -> Frontend? {
            guard try waitReadable([listener.rawValue], timeoutMilliseconds: 15_000)[0] else { return nil }
            return Frontend(socket: try listener.accept())
        }
        for round in 0..<3 {
            guard let frontend = try accept() else {
                Issue.record("round \(round): the service did not connect within 15 s")
                return
            }
            let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
            #expect(roundTrip(guest, sizes: [60, 700, 1514], seed: UInt8(round)))
            frontend.close()
            #expect(eventually { !device.isActive }, "round \(round): reset after the VMM closed the connection")
        }
        #expect(service.connectionCount >= 3)
    }

    @Test("Client mode: the service keeps trying until the VMM's socket appears")
    func clientModeWaitsForTheSocket() throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.path + "/late.sock"
        let backend = try LoopbackBackend(queuePairs: 1)
        let device = try NetDevice(configuration: NetConfiguration(mac: deviceMAC, queuePairs: 1, maximumQueueSize: 256), backend: backend, logger: quietLogger)
        let service = try VhostUserService(path: path, mode: .client, device: device, logger: quietLogger)
        try service.start()
        defer { service.stop() }
        // The socket appears after the service started trying (its back-off is at most 2 s).
        #expect(service.connectionCount == 0)
        let listener = try UnixSocket.listen(path: path)
        #expect(try waitReadable([listener.rawValue], timeoutMilliseconds: 15_000)[0], "connected once the socket exists")
        let frontend = Frontend(socket: try listener.accept())
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
        #expect(roundTrip(guest, sizes: [60]))
    }

    @Test("stop() ends a live connection, resets the device and removes the server socket")
    func stopEndsTheConnection() throws {
        let served = try ServedDevice()
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        #expect(roundTrip(guest, sizes: [60]))
        served.service.stop()
        #expect(!served.device.isActive)
        #expect(frontend.waitForClose(), "the frontend sees the connection end")
        #expect(access(served.path, F_OK) != 0, "the socket file is gone")
        served.directory.remove()
    }

    @Test("Server mode: a second connection while a frontend is attached is closed at once, with a warning naming the device and socket; the first goes on")
    func secondConnectionIsRefusedPromptly() throws {
        let capture = LogCapture()
        let name = "second-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let served = try ServedDevice(logger: capture.logger(metadata: ["device": name]))
        defer { served.stop() }
        let first = try served.connect()
        let guest = try first.negotiate(memory: try SimulatedGuestMemory())
        #expect(roundTrip(guest, sizes: [60]))

        for attempt in 0..<3 {
            let second = try served.connect()
            let started = monotonicNow()
            #expect(second.waitForClose(timeout: 10), "attempt \(attempt): the second connection is closed, not left hanging")
            #expect(monotonicNow() - started < 5, "attempt \(attempt): closed promptly")
        }
        // The first frontend is still served: a round trip and traffic.
        #expect(try first.getFeatures() != 0)
        #expect(roundTrip(guest, sizes: [60, 1514], seed: 9))
        #expect(served.service.connectionCount == 1, "refused connections are not frontends")
        #expect(served.service.refusedCount == 3)
        let warnings = capture.records.filter { $0.level == .warning && $0.metadata["socket"] == served.path }
        #expect(warnings.count == 3, "one warning per refused connection: \(capture.records.map { "\($0.level) \($0.message) \($0.metadata)" })")
        #expect(warnings.allSatisfy { $0.metadata["device"] == name }, "the warning names the device")
    }

    @Test("A connection that sends nothing is dropped after the handshake timeout; the next frontend is served")
    func silentConnectionIsDropped() throws {
        let served = try ServedDevice(handshakeTimeout: .milliseconds(200))
        defer { served.stop() }
        let silent = try served.connect()
        #expect(silent.waitForClose(timeout: 10), "a connection that never sends a message is closed")
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        #expect(roundTrip(guest, sizes: [60, 1514]))
    }

    @Test("A connection that stops in the middle of a message is dropped after the handshake timeout",
          arguments: ["in the first header", "in a header after a round trip", "in a payload after a round trip"])
    func halfSentMessageIsDropped(_ where_: String) throws {
        let served = try ServedDevice(handshakeTimeout: .milliseconds(200))
        defer { served.stop() }
        let frontend = try served.connect()
        let header = Frontend.header(request: Frontend.Request.setFeatures.rawValue, flags: Frontend.version, size: 8)
        switch where_ {
        case "in the first header":
            try frontend.sendRaw(Array(header.prefix(5)))
        case "in a header after a round trip":
            #expect(try frontend.getFeatures() != 0)
            try frontend.sendRaw(Array(header.prefix(11)))
        default:
            #expect(try frontend.getFeatures() != 0)
            try frontend.sendRaw(header + [0x01, 0x02, 0x03])
        }
        #expect(frontend.waitForClose(timeout: 10), "\(where_): the connection is closed")
        let next = try served.connect()
        let guest = try next.negotiate(memory: try SimulatedGuestMemory())
        #expect(roundTrip(guest, sizes: [60]))
    }

    @Test("An established frontend that stays quiet for longer than the handshake timeout keeps its connection")
    func quietFrontendIsKept() throws {
        let served = try ServedDevice(handshakeTimeout: .milliseconds(100))
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        // Ten times the timeout without a message (QEMU is quiet in steady state): still connected.
        #expect(!frontend.waitForClose(timeout: 1), "a quiet established connection was dropped")
        #expect(try frontend.getFeatures() != 0)
        #expect(roundTrip(guest, sizes: [60, 1514]))
        #expect(served.device.isActive)
    }

    @Test("stop() returns promptly while a frontend is attached and a second connection waits")
    func stopWithASecondConnectionWaiting() throws {
        let served = try ServedDevice()
        let first = try served.connect()
        _ = try first.negotiate(memory: try SimulatedGuestMemory())
        let second = try served.connect()
        let silent = try served.connect()
        let started = monotonicNow()
        served.stop()
        #expect(monotonicNow() - started < 5)
        #expect(first.waitForClose())
        #expect(second.waitForClose())
        #expect(silent.waitForClose())
    }

    @Test("A server socket path that is taken by a live service, or is not a socket, is refused")
    func socketPathChecks() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let backend = try LoopbackBackend(queuePairs: 1)
        let device = try NetDevice(configuration: NetConfiguration(mac: deviceMAC), backend: backend, logger: quietLogger)
        #expect(throws: SystemError.self, "another service serves it") {
            _ = try VhostUserService(path: served.path, mode: .server, device: device, logger: quietLogger)
        }
        let file = served.directory.path + "/plain-file"
        #expect(FileManagerShim.create(file))
        #expect(throws: SystemError.self, "a regular file") {
            _ = try VhostUserService(path: file, mode: .server, device: device, logger: quietLogger)
        }
        // A stale socket (its service gone without removing it) is replaced.
        let stale = served.directory.path + "/stale.sock"
        do { _ = try UnixSocket.listen(path: stale) }
        let service = try VhostUserService(path: stale, mode: .server, device: device, logger: quietLogger)
        try service.start()
        defer { service.stop() }
        let frontend = try Frontend.connect(path: stale)
        #expect(try frontend.getQueueNum() == 1)
    }
}

enum FileManagerShim {
    static func create(_ path: String) -> Bool {
        let fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return false }
        close(fd)
        return true
    }
}
