#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Foundation
import Synchronization
import Sys
import Testing
import VirtioNet
import VirtioNetTestSupport

// MARK: Processes

/// The virtio-netd binary next to this test bundle (the same build products), else in the package's
/// usual scratch paths.
let daemonPath: String? = {
    var candidates: [String] = []
    if let executable = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
        candidates.append(URL(fileURLWithPath: executable).deletingLastPathComponent().appendingPathComponent("virtio-netd").path)
    }
    candidates += [packageRoot + "/.build-vu/debug/virtio-netd", packageRoot + "/.build/debug/virtio-netd"]
    return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
}()

struct ProcessResult {
    var status: Int32
    var output: String
    var error: String
}

/// Runs a program to completion (at most `timeout` seconds, then it is killed) and returns its status
/// and output.
@discardableResult
func runProgram(_ executable: String, _ arguments: [String], timeout: Double = 60) throws -> ProcessResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    let directory = try TemporaryDirectory("vu-run")
    defer { directory.remove() }
    _ = FileManager.default.createFile(atPath: directory.path + "/out", contents: nil)
    _ = FileManager.default.createFile(atPath: directory.path + "/err", contents: nil)
    let output = try FileHandle(forWritingTo: URL(fileURLWithPath: directory.path + "/out"))
    let error = try FileHandle(forWritingTo: URL(fileURLWithPath: directory.path + "/err"))
    process.standardOutput = output
    process.standardError = error
    process.standardInput = FileHandle.nullDevice
    try process.run()
    if !eventually(timeout: timeout, { !process.isRunning }) {
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        throw Frontend.FrontendError("\(executable) \(arguments) did not finish within \(timeout) s")
    }
    process.waitUntilExit()
    try output.close()
    try error.close()
    return ProcessResult(status: process.terminationStatus,
                         output: (try? String(contentsOfFile: directory.path + "/out", encoding: .utf8)) ?? "",
                         error: (try? String(contentsOfFile: directory.path + "/err", encoding: .utf8)) ?? "")
}

/// `ip ARGUMENTS`; throws unless it succeeds.
@discardableResult
func ip(_ arguments: String...) throws -> String {
    let result = try runProgram("/usr/sbin/ip", arguments, timeout: 30)
    guard result.status == 0 else { throw Frontend.FrontendError("ip \(arguments.joined(separator: " ")): \(result.error)") }
    return result.output
}

/// Whether `ip ARGUMENTS` succeeds (e.g. `link show NAME`).
func ipSucceeds(_ arguments: String...) -> Bool {
    (try? runProgram("/usr/sbin/ip", arguments, timeout: 30).status) == 0
}

/// A network namespace of this test run, deleted by `delete()`.
final class TestNamespace: Sendable {
    private static let counter = Atomic<Int>(0)
    let name: String
    init() throws {
        name = "vud-\(getpid())-\(Self.counter.add(1, ordering: .relaxed).newValue)"
        try ip("netns", "add", name)
        try ip("-n", name, "link", "set", "lo", "up")
    }
    func delete() { _ = try? runProgram("/usr/sbin/ip", ["netns", "delete", name]) }

    /// Runs `body` on a new thread that has entered the namespace (sockets it opens live there).
    func run<Result: Sendable>(_ body: @escaping @Sendable () throws -> Result) throws -> Result {
        let path = "/run/netns/\(name)"
        let outcome = Mutex<Swift.Result<Result, any Error>?>(nil)
        let thread = try WorkerThread(name: "netns") {
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0, cvs_setns(fd, CVS_CLONE_NEWNET) == 0 else {
                let code = errno
                if fd >= 0 { close(fd) }
                outcome.withLock { $0 = .failure(SystemError(call: "setns(\(path))", code: code)) }
                return
            }
            close(fd)
            let result = Swift.Result { try body() }
            outcome.withLock { $0 = result }
        }
        thread.join()
        return try outcome.withLock { $0! }.get()
    }

    /// The kernel's packet counters of `link` in the namespace: (rx, tx).
    func packetCounters(_ link: String) throws -> (rx: UInt64, tx: UInt64) {
        let json = try ip("-n", name, "-s", "-j", "link", "show", link)
        guard let array = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]],
              let stats = array.first?["stats64"] as? [String: Any],
              let rx = (stats["rx"] as? [String: Any])?["packets"] as? NSNumber,
              let tx = (stats["tx"] as? [String: Any])?["packets"] as? NSNumber
        else { throw Frontend.FrontendError("no counters for \(link) in \(json)") }
        return (rx.uint64Value, tx.uint64Value)
    }
}

/// A minimal HTTP/1.0 GET over TCP to 127.0.0.1:`port`, run in the calling thread's namespace.
/// GET /metrics from inside `namespace`, retried until the endpoint listens (the daemon starts it
/// after its devices, so their sockets may be there first) or 20 s pass.
func fetchMetrics(_ namespace: TestNamespace, port: UInt16) throws -> String {
    var body: String? = nil
    var lastError: Error? = nil
    _ = eventually(timeout: 20) {
        do { body = try namespace.run { try httpGet(port: port, path: "/metrics") } } catch { lastError = error }
        return body != nil
    }
    guard let body else { throw lastError ?? Frontend.FrontendError("no metrics from port \(port)") }
    return body
}

func httpGet(port: UInt16, path: String) throws -> String {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw SystemError(call: "socket", code: errno) }
    defer { close(fd) }
    var timeout = timeval(tv_sec: 10, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = port.bigEndian
    inet_pton(AF_INET, "127.0.0.1", &address.sin_addr)
    let connected = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard connected == 0 else { throw SystemError(call: "connect(127.0.0.1:\(port))", code: errno) }
    let request = Array("GET \(path) HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".utf8)
    guard request.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == request.count else {
        throw SystemError(call: "send", code: errno)
    }
    var response: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if count < 0 { throw SystemError(call: "recv", code: errno) }
        if count == 0 { break }
        response += buffer[0..<count]
    }
    return String(decoding: response, as: UTF8.self)
}

/// The value of the Prometheus sample `name{labels...}` whose labels include all of `labels`.
func metricValue(_ body: String, name: String, labels: [String: String]) -> Double? {
    for line in body.split(separator: "\n") where line.hasPrefix(name + "{") {
        guard let close = line.lastIndex(of: "}") else { continue }
        let labelText = line[line.index(line.startIndex, offsetBy: name.count + 1)..<close]
        let pairs = labelText.split(separator: ",").map { $0.split(separator: "=", maxSplits: 1).map(String.init) }
        var found: [String: String] = [:]
        for pair in pairs where pair.count == 2 { found[pair[0]] = pair[1].trimmingCharacters(in: CharacterSet(charactersIn: "\"")) }
        guard labels.allSatisfy({ found[$0.key] == $0.value }) else { continue }
        return Double(line[line.index(after: close)...].trimmingCharacters(in: .whitespaces))
    }
    return nil
}

// MARK: Frames

/// An ARP request from `mac`/`senderIP` for `targetIP`, padded to 60 bytes.
func arpRequest(from mac: MACAddress, senderIP: [UInt8], targetIP: [UInt8]) -> [UInt8] {
    var frame = MACAddress.broadcast.array + mac.array + [0x08, 0x06]
    frame += [0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]
    frame += mac.array + senderIP + [0, 0, 0, 0, 0, 0] + targetIP
    return frame + [UInt8](repeating: 0, count: 60 - frame.count)
}

/// Whether `frame` is an ARP reply from `senderIP` to `mac`.
func isARPReply(_ frame: [UInt8], to mac: MACAddress, from senderIP: [UInt8]) -> Bool {
    frame.count >= 42 && Array(frame[0..<6]) == mac.array && frame[12] == 0x08 && frame[13] == 0x06
        && frame[20] == 0 && frame[21] == 2 && Array(frame[28..<32]) == senderIP
}

// MARK: A running daemon

/// virtio-netd run by `ip netns exec` inside a namespace, its output in files.
final class DaemonProcess {
    let process = Process()
    let directory: String
    /// `openFiles`: "SOFT:HARD" for RLIMIT_NOFILE, set with prlimit before the daemon starts.
    init(namespace: TestNamespace, configuration: String, directory: String, openFiles: String? = nil) throws {
        guard let daemonPath else { throw Frontend.FrontendError("virtio-netd is not built") }
        self.directory = directory
        let file = directory + "/virtio-netd.toml"
        try configuration.write(toFile: file, atomically: true, encoding: .utf8)
        _ = FileManager.default.createFile(atPath: directory + "/stdout", contents: nil)
        _ = FileManager.default.createFile(atPath: directory + "/stderr", contents: nil)
        // prlimit and ip both exec what follows them: the process is the daemon's once it runs.
        let command = ["/usr/sbin/ip", "netns", "exec", namespace.name, daemonPath, "--config", file]
        let full = openFiles.map { [prlimitPath, "--nofile=\($0)"] + command } ?? command
        process.executableURL = URL(fileURLWithPath: full[0])
        process.arguments = Array(full.dropFirst())
        process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: directory + "/stdout"))
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: directory + "/stderr"))
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    var log: String { (try? String(contentsOfFile: directory + "/stderr", encoding: .utf8)) ?? "" }

    /// SIGTERM, then waits for the exit; nil if it did not exit within `timeout` seconds.
    func terminate(timeout: Double = 20) -> Int32? {
        guard process.isRunning else { return process.terminationStatus }
        kill(process.processIdentifier, SIGTERM)
        guard eventually(timeout: timeout, { !process.isRunning }) else { return nil }
        process.waitUntilExit()
        return process.terminationStatus
    }

    /// For cleanup after a failure: SIGKILL and reap.
    func kill9() {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }
}

private let isRoot = getuid() == 0
private let ipAvailable = FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip")
let prlimitPath = "/usr/bin/prlimit"
private let prlimitAvailable = FileManager.default.isExecutableFile(atPath: prlimitPath)

/// The soft and hard "Max open files" of a process, from /proc/PID/limits.
func openFileLimits(of pid: Int32) -> (soft: String, hard: String)? {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8),
          let line = text.split(separator: "\n").first(where: { $0.hasPrefix("Max open files") }) else { return nil }
    let fields = line.dropFirst("Max open files".count).split(separator: " ")
    guard fields.count >= 2 else { return nil }
    return (String(fields[0]), String(fields[1]))
}

/// How many descriptors a process has open, from /proc/PID/fd.
func openDescriptorCount(of pid: Int32) -> Int? {
    (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd"))?.count
}

@Suite("virtio-netd as a process", .serialized)
struct DaemonProcessTests {
    @Test("--check-config accepts config/virtio-netd.toml and prints the device")
    func checkConfig() throws {
        let daemon = try #require(daemonPath, "virtio-netd is built with the tests")
        let result = try runProgram(daemon, ["--check-config", packageRoot + "/config/virtio-netd.toml"])
        #expect(result.status == 0, "\(result.error)")
        #expect(result.output.contains("valid, 1 device(s)"))
        #expect(result.output.contains("vm1-net0"))
        #expect(result.output.contains("/run/virtio-netd/vm1-net0.sock"))
        #expect(result.output.contains("tap vm1tap0"))
        #expect(result.output.contains("2 queue pair(s) of 256"))
        #expect(result.output.contains("mac 52:54:00:12:34:56"))
        #expect(result.output.contains("metrics: http://127.0.0.1:9464/metrics"))
    }

    @Test("A bad configuration exits non-zero with file:line: key on stderr, and starts nothing")
    func checkConfigRejects() throws {
        let daemon = try #require(daemonPath)
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let file = directory.path + "/bad.toml"
        try configuration(replacing: 12, with: "mtu = 70000").write(toFile: file, atomically: true, encoding: .utf8)
        for mode in ["--check-config", "--config"] {
            let result = try runProgram(daemon, [mode, file])
            #expect(result.status != 0, "\(mode)")
            #expect(result.error.contains("\(file):12: device[0].mtu: 70000 is outside"), "\(mode): \(result.error)")
            #expect(result.output.isEmpty, "\(mode)")
        }
        let missing = try runProgram(daemon, ["--check-config", directory.path + "/missing.toml"])
        #expect(missing.status != 0)
        #expect(missing.error.contains(directory.path + "/missing.toml"))
    }

    @Test("--version, --help and bad usage")
    func versionAndHelp() throws {
        let daemon = try #require(daemonPath)
        let version = try runProgram(daemon, ["--version"])
        #expect(version.status == 0)
        #expect(version.output.contains("virtio-netd"))
        let help = try runProgram(daemon, ["--help"])
        #expect(help.status == 0)
        #expect(help.output.contains("--config"))
        #expect(help.output.contains("--check-config"))
        let neither = try runProgram(daemon, [])
        #expect(neither.status != 0)
        #expect(neither.error.contains("--config"))
        let both = try runProgram(daemon, ["--config", "a", "--check-config", "b"])
        #expect(both.status != 0)
    }

    @Test("In a network namespace: two devices serve frontends, traffic reaches the TAP and back, metrics count it, SIGTERM cleans up",
          .enabled(if: isRoot && ipAvailable, "needs root and iproute2"))
    func daemonInNamespace() throws {
        _ = try #require(daemonPath, "virtio-netd is built with the tests")
        let namespace = try TestNamespace()
        defer { namespace.delete() }
        let directory = try TemporaryDirectory("vu-daemon")
        defer { directory.remove() }
        let tag = String(getpid() % 100_000)
        let taps = ["vut\(tag)a", "vut\(tag)b"]
        let sockets = [directory.path + "/run/net0.sock", directory.path + "/run/net1.sock"]
        let port = UInt16(20000 + getpid() % 20000)
        let macs = [MACAddress(0x52, 0x54, 0x00, 0x00, 0xaa, 0x01), MACAddress(0x52, 0x54, 0x00, 0x00, 0xaa, 0x02)]
        let text = """
        [daemon]
        log_level = "info"
        metrics = "127.0.0.1:\(port)"

        [[device]]
        name = "net0"
        socket = "\(sockets[0])"
        tap = "\(taps[0])"
        queue_pairs = 2
        mac = "\(macs[0])"

        [[device]]
        name = "net1"
        socket = "\(sockets[1])"
        tap = "\(taps[1])"
        mac = "\(macs[1])"
        mtu = 9000
        """
        let daemon = try DaemonProcess(namespace: namespace, configuration: text, directory: directory.path)
        defer { daemon.kill9() }

        #expect(eventually(timeout: 30) { sockets.allSatisfy { access($0, F_OK) == 0 } || !daemon.process.isRunning },
                "both sockets appear")
        try #require(daemon.process.isRunning, "the daemon is running: \(daemon.log)")
        for tap in taps {
            #expect(ipSucceeds("-n", namespace.name, "link", "show", tap), "\(tap) exists in the namespace")
            #expect(!ipSucceeds("link", "show", tap), "\(tap) never appears in the root namespace")
        }
        let details = try ip("-n", namespace.name, "-d", "link", "show", taps[1])
        #expect(details.contains("mtu 9000"), "the TAP has the configured MTU: \(details)")
        #expect(details.contains("tun type tap"), "\(details)")

        // The kernel answers ARP for an address on the TAP: guest -> TAP -> kernel -> TAP -> guest.
        try ip("-n", namespace.name, "addr", "add", "198.18.0.1/24", "dev", taps[0])
        let before = try namespace.packetCounters(taps[0])
        let frontend = try Frontend.connect(path: sockets[0], timeout: 10)
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(), queuePairs: 2)
        let config = try frontend.getConfig()
        #expect(Array(config[0..<6]) == macs[0].array)
        #expect(LE.u16(config, at: 8) == 2)
        guest.postReceiveBuffers(pair: 0, count: 64)
        guest.postReceiveBuffers(pair: 1, count: 64)
        let request = arpRequest(from: macs[0], senderIP: [198, 18, 0, 2], targetIP: [198, 18, 0, 1])
        var sent = 0
        var replies = 0
        let deadline = monotonicNow() + 20
        while replies == 0 && monotonicNow() < deadline {
            #expect(guest.transmit(request))
            sent += 1
            guest.waitUntil(timeout: 1) {
                for pair in 0..<2 {
                    replies += guest.receivedFrames(pair: pair).filter { isARPReply($0, to: macs[0], from: [198, 18, 0, 1]) }.count
                }
                return replies > 0
            }
            _ = guest.completedTransmits()
        }
        #expect(replies > 0, "an ARP reply came back through the TAP")
        let after = try namespace.packetCounters(taps[0])
        #expect(after.rx >= before.rx + UInt64(sent), "the TAP received the guest's \(sent) frame(s): \(before) -> \(after)")
        #expect(after.tx > before.tx, "the TAP sent the reply: \(before) -> \(after)")

        // The second device is served too.
        let second = try Frontend.connect(path: sockets[1], timeout: 10)
        let secondGuest = try second.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
        #expect(LE.u16(try second.getConfig(), at: 10) == 9000)
        let secondBefore = try namespace.packetCounters(taps[1])
        #expect(secondGuest.transmit(ethernetFrame(length: 100, destination: .broadcast, source: macs[1])))
        #expect(eventually { ((try? namespace.packetCounters(taps[1]).rx) ?? 0) > secondBefore.rx }, "frames from the second device reach its TAP")

        // Metrics, fetched from inside the namespace.
        let body = try fetchMetrics(namespace, port: port)
        #expect(body.hasPrefix("HTTP/1.1 200"), "\(body.prefix(200))")
        let transmitted = metricValue(body, name: "virtio_net_frames_total", labels: ["device": "net0", "queue": "tx0"])
        #expect((transmitted ?? 0) >= Double(sent), "net0 tx0 frames: \(transmitted.map { "\($0)" } ?? "missing") in\n\(body)")
        let received = (metricValue(body, name: "virtio_net_frames_total", labels: ["device": "net0", "queue": "rx0"]) ?? 0)
            + (metricValue(body, name: "virtio_net_frames_total", labels: ["device": "net0", "queue": "rx1"]) ?? 0)
        #expect(received >= 1, "net0 received frames")
        #expect(metricValue(body, name: "virtio_net_frames_total", labels: ["device": "net1", "queue": "tx0"]) != nil)
        let notFound = try namespace.run { try httpGet(port: port, path: "/other") }
        #expect(notFound.hasPrefix("HTTP/1.1 404"))

        // SIGTERM: exit 0, sockets removed, the TAPs it created gone.
        let status = daemon.terminate()
        #expect(status == 0, "exit status; log:\n\(daemon.log)")
        #expect(frontend.waitForClose(), "the frontend's connection ended")
        for socket in sockets { #expect(access(socket, F_OK) != 0, "\(socket) removed") }
        for tap in taps {
            #expect(eventually { !ipSucceeds("-n", namespace.name, "link", "show", tap) }, "\(tap) deleted")
        }
        #expect(daemon.log.contains("virtio-netd stopped"))
    }

    @Test("A device whose TAP name is taken by a non-TAP link fails to start and is logged; the others work; an existing TAP is attached and left in place",
          .enabled(if: isRoot && ipAvailable, "needs root and iproute2"))
    func tapNameCollision() throws {
        _ = try #require(daemonPath)
        let namespace = try TestNamespace()
        defer { namespace.delete() }
        let directory = try TemporaryDirectory("vu-daemon")
        defer { directory.remove() }
        let tag = String(getpid() % 100_000)
        let taken = "vut\(tag)v", good = "vut\(tag)g"
        let existing = "vut\(tag)e"
        try ip("-n", namespace.name, "link", "add", taken, "type", "veth", "peer", "name", "vup\(tag)")
        try ip("-n", namespace.name, "tuntap", "add", existing, "mode", "tap", "multi_queue", "vnet_hdr")
        let sockets = [directory.path + "/taken.sock", directory.path + "/good.sock", directory.path + "/existing.sock"]
        let text = """
        [[device]]
        name = "collides"
        socket = "\(sockets[0])"
        tap = "\(taken)"

        [[device]]
        name = "works"
        socket = "\(sockets[1])"
        tap = "\(good)"

        [[device]]
        name = "attached"
        socket = "\(sockets[2])"
        tap = "\(existing)"
        queue_pairs = 2
        """
        let daemon = try DaemonProcess(namespace: namespace, configuration: text, directory: directory.path)
        defer { daemon.kill9() }
        #expect(eventually(timeout: 30) { (access(sockets[1], F_OK) == 0 && access(sockets[2], F_OK) == 0) || !daemon.process.isRunning })
        try #require(daemon.process.isRunning, "the daemon runs with one device: \(daemon.log)")
        #expect(eventually { daemon.log.contains("device failed to start") }, "\(daemon.log)")
        let failure = daemon.log.split(separator: "\n").first { $0.contains("device failed to start") }.map(String.init) ?? ""
        #expect(failure.contains("collides"), "the failing device is named: \(failure)")
        #expect(access(sockets[0], F_OK) != 0, "no socket for the device that failed")

        let frontend = try Frontend.connect(path: sockets[1])
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
        let before = try namespace.packetCounters(good)
        #expect(guest.transmit(ethernetFrame(length: 60, destination: .broadcast)))
        #expect(eventually { ((try? namespace.packetCounters(good).rx) ?? 0) > before.rx })

        // The existing TAP is attached (with both queues) and passes traffic.
        #expect(daemon.log.split(separator: "\n").contains { $0.contains("device=attached") && $0.contains("tap_created=false") }, "\(daemon.log)")
        let attached = try Frontend.connect(path: sockets[2])
        let attachedGuest = try attached.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20), queuePairs: 2)
        let existingBefore = try namespace.packetCounters(existing)
        #expect(attachedGuest.transmit(ethernetFrame(length: 60, destination: .broadcast), pair: 1))
        #expect(eventually { ((try? namespace.packetCounters(existing).rx) ?? 0) > existingBefore.rx })

        #expect(daemon.terminate() == 0, "\(daemon.log)")
        #expect(ipSucceeds("-n", namespace.name, "link", "show", taken), "the veth it did not create is left alone")
        #expect(ipSucceeds("-n", namespace.name, "link", "show", existing), "the TAP it did not create is left in place")
        #expect(eventually { !ipSucceeds("-n", namespace.name, "link", "show", good) })
    }

    @Test("A memory region larger than its memfd is refused, and a ring placed past the file's end cannot kill the daemon",
          .enabled(if: isRoot && ipAvailable, "needs root and iproute2"))
    func regionPastTheEndOfItsFile() throws {
        _ = try #require(daemonPath)
        let namespace = try TestNamespace()
        defer { namespace.delete() }
        let directory = try TemporaryDirectory("vu-daemon")
        defer { directory.remove() }
        let socket = directory.path + "/d.sock"
        let tag = String(getpid() % 100_000)
        let daemon = try DaemonProcess(namespace: namespace, configuration: "[[device]]\nname = \"d\"\nsocket = \"\(socket)\"\ntap = \"vut\(tag)s\"\n",
                                       directory: directory.path)
        defer { daemon.kill9() }
        let frontend = try Frontend.connect(path: socket, timeout: 30)
        let memory = try SimulatedGuestMemory(regionSize: 4 << 20)
        try frontend.setFeatures(try frontend.getFeatures())
        try frontend.setProtocolFeatures(Frontend.defaultProtocolFeatures)
        // The memfd has 4 MiB; the region claims 8.
        var region = Frontend.regions(of: memory)[0]
        region.size *= 2
        let outcome = frontend.exchange(Frontend.Request.setMemTable.rawValue, flags: Frontend.version | Frontend.needReplyFlag,
                                        payload: Frontend.memTablePayload([region]), fds: memory.fds)
        #expect(isRefusal(outcome), "SET_MEM_TABLE with a region past the end of its memfd: \(outcome)")
        if case .reply = outcome {
            // Accepted: put ring 1 at 6 MiB, past the file's end, and start it.
            let past = region.userAddress + (6 << 20)
            try? frontend.setVringNum(1, 256)
            try? frontend.setVringBase(1, 0)
            try? frontend.setVringAddr(1, descriptorTable: past, usedRing: past + 0x2000, availableRing: past + 0x1000)
            let kick = try EventFD()
            try? frontend.setVringKick(1, fd: kick.rawValue)
            _ = frontend.exchange(Frontend.Request.setVringEnable.rawValue, flags: Frontend.version | Frontend.needReplyFlag,
                                  payload: Frontend.vringState(1, 1))
        }
        // A round trip shows the daemon alive; if it is not, say how it died.
        if !frontend.sync() {
            _ = eventually { !daemon.process.isRunning }
            Issue.record("the daemon died: \(daemon.process.terminationReason == .uncaughtSignal ? "signal" : "exit status") \(daemon.process.terminationStatus); log:\n\(daemon.log)")
        }
    }

    @Test("A second connection to an attached device is closed at once and logged with the device and socket; a silent one is dropped after handshake_timeout_ms",
          .enabled(if: isRoot && ipAvailable, "needs root and iproute2"))
    func secondAndSilentConnections() throws {
        _ = try #require(daemonPath)
        let namespace = try TestNamespace()
        defer { namespace.delete() }
        let directory = try TemporaryDirectory("vu-daemon")
        defer { directory.remove() }
        let socket = directory.path + "/h.sock"
        let tag = String(getpid() % 100_000)
        let text = "[[device]]\nname = \"held\"\nsocket = \"\(socket)\"\ntap = \"vut\(tag)h\"\nhandshake_timeout_ms = 300\n"
        let daemon = try DaemonProcess(namespace: namespace, configuration: text, directory: directory.path)
        defer { daemon.kill9() }

        let silent = try Frontend.connect(path: socket, timeout: 30)
        #expect(silent.waitForClose(timeout: 10), "a connection that sends nothing is dropped")
        let first = try Frontend.connect(path: socket)
        let guest = try first.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
        let second = try Frontend.connect(path: socket)
        #expect(second.waitForClose(timeout: 10), "the second connection is closed at once")
        #expect(try first.getFeatures() != 0, "the first frontend is still served")
        #expect(guest.transmit(ethernetFrame(length: 60, destination: .broadcast)))
        #expect(eventually { daemon.log.contains("a frontend is already attached") }, "\(daemon.log)")
        let line = daemon.log.split(separator: "\n").first { $0.contains("a frontend is already attached") }.map(String.init) ?? ""
        #expect(line.contains("warning") && line.contains("device=held") && line.contains("socket=\(socket)"), "\(line)")
        #expect(daemon.log.contains("too slow"), "the dropped silent connection is logged: \(daemon.log)")
        #expect(daemon.terminate() == 0, "\(daemon.log)")
    }

    @Test("The daemon raises its soft descriptor limit to the hard one, warns when its devices may need more, and reports each device's descriptors in the metrics",
          .enabled(if: isRoot && ipAvailable && prlimitAvailable, "needs root, iproute2 and prlimit"))
    func descriptorLimit() throws {
        _ = try #require(daemonPath)
        let namespace = try TestNamespace()
        defer { namespace.delete() }
        let directory = try TemporaryDirectory("vu-daemon")
        defer { directory.remove() }
        let tag = String(getpid() % 100_000)
        let port = UInt16(20000 + (getpid() + 7) % 20000)
        let sockets = [directory.path + "/fa.sock", directory.path + "/fb.sock"]
        // Each device may need 10 per queue pair + 13 = 173 descriptors: 346 in all, over the hard limit of 300.
        let text = """
        [daemon]
        metrics = "127.0.0.1:\(port)"

        [[device]]
        name = "fa"
        socket = "\(sockets[0])"
        tap = "vut\(tag)fa"
        queue_pairs = 16

        [[device]]
        name = "fb"
        socket = "\(sockets[1])"
        tap = "vut\(tag)fb"
        queue_pairs = 16
        """
        let daemon = try DaemonProcess(namespace: namespace, configuration: text, directory: directory.path, openFiles: "64:300")
        defer { daemon.kill9() }
        #expect(eventually(timeout: 30) { sockets.allSatisfy { access($0, F_OK) == 0 } || !daemon.process.isRunning })
        try #require(daemon.process.isRunning, "the daemon runs: \(daemon.log)")
        let pid = daemon.process.processIdentifier

        let limits = openFileLimits(of: pid)
        #expect(limits?.soft == "300" && limits?.hard == "300", "soft raised to hard: \(limits.map { "\($0)" } ?? "unreadable")")
        let warning = daemon.log.split(separator: "\n").first { $0.contains("warning") && $0.contains("descriptor") }.map(String.init)
        #expect(warning?.contains("limit=300") == true, "a warning names the limit: \(daemon.log)")
        #expect(daemon.log.split(separator: "\n").contains { $0.contains("device=fa") && $0.contains("descriptors_worst_case=173") }, "\(daemon.log)")

        // A frontend on two of fa's queue pairs: its rings' eventfds and workers are counted.
        let frontend = try Frontend.connect(path: sockets[0])
        _ = try frontend.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20), queuePairs: 2)
        let body = try fetchMetrics(namespace, port: port)
        let heldA = metricValue(body, name: "virtio_net_descriptors_held", labels: ["device": "fa"])
        let heldB = metricValue(body, name: "virtio_net_descriptors_held", labels: ["device": "fb"])
        // fa: 16 TAP queues and its control socket, the service's listener, stop eventfd and
        // connection, kick and call of 4 rings, an epoll and a stop eventfd for each of 2 workers.
        #expect((heldA ?? 0) >= 17 + 3 + 8 + 4, "fa holds at least 32: \(heldA.map { "\($0)" } ?? "missing") in\n\(body)")
        #expect((heldA ?? .infinity) <= 173)
        #expect((heldB ?? 0) >= 17 + 2 && (heldB ?? .infinity) < (heldA ?? 0), "fb, without a frontend: \(heldB.map { "\($0)" } ?? "missing")")
        #expect(metricValue(body, name: "virtio_net_descriptors_worst_case", labels: ["device": "fa"]) == 173)
        #expect(body.contains("virtio_net_descriptor_limit 300"), "\(body)")
        if let open = openDescriptorCount(of: pid), let heldA, let heldB {
            #expect(Double(open) >= heldA + heldB, "the process has \(open) open; the devices hold \(heldA) + \(heldB)")
        }
        frontend.close()
        #expect(daemon.terminate() == 0, "\(daemon.log)")
    }

    @Test("A frontend that shrinks guest RAM under running rings cannot kill the daemon: its rings stop (SET_VRING_ERR), the other device is served",
          .enabled(if: isRoot && ipAvailable, "needs root and iproute2"))
    func guestMemoryShrinksUnderRunningRings() throws {
        _ = try #require(daemonPath)
        let namespace = try TestNamespace()
        defer { namespace.delete() }
        let directory = try TemporaryDirectory("vu-daemon")
        defer { directory.remove() }
        let tag = String(getpid() % 100_000)
        let configuration = ["a", "b"].map { name in
            "[[device]]\nname = \"\(name)\"\nsocket = \"\(directory.path)/\(name).sock\"\ntap = \"vut\(tag)\(name)\"\n"
        }.joined()
        let daemon = try DaemonProcess(namespace: namespace, configuration: configuration, directory: directory.path)
        defer { daemon.kill9() }
        let frontend = try Frontend.connect(path: directory.path + "/a.sock", timeout: 30)
        let memory = try SimulatedGuestMemory(regionSize: 4 << 20)
        let guest = try frontend.negotiate(memory: memory)
        let error = try EventFD()
        try frontend.call(.setVringErr, payload: LE.u64(1), fds: [error.rawValue])
        try #require(frontend.sync())

        // The frontend truncates guest RAM and kicks the transmit ring: the worker's next access
        // to the ring is past the end of the file. (This process does not touch that memory again.)
        #expect(ftruncate(memory.fds[0], 0) == 0)
        try guest.kicks[1]?.signal()
        let signalled = eventually(timeout: 20) { (try? error.drain()) != nil }
        if !frontend.sync() {
            _ = eventually { !daemon.process.isRunning }
            Issue.record("the daemon died: \(daemon.process.terminationReason == .uncaughtSignal ? "signal" : "exit status") \(daemon.process.terminationStatus); log:\n\(daemon.log)")
            return
        }
        #expect(signalled, "the ring's error eventfd was signalled")
        #expect(daemon.log.contains("guest memory shrank"), "the log says why: \(daemon.log)")

        // The other device serves a new frontend.
        let other = try Frontend.connect(path: directory.path + "/b.sock", timeout: 30)
        _ = try other.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
        #expect(other.sync())
        #expect(daemon.terminate() == 0)
    }

    @Test("A daemon whose every device fails to start exits non-zero", .enabled(if: isRoot && ipAvailable, "needs root and iproute2"))
    func noDeviceStarts() throws {
        let daemon = try #require(daemonPath)
        let namespace = try TestNamespace()
        defer { namespace.delete() }
        let directory = try TemporaryDirectory("vu-daemon")
        defer { directory.remove() }
        let tag = String(getpid() % 100_000)
        try ip("-n", namespace.name, "link", "add", "vut\(tag)x", "type", "veth", "peer", "name", "vup\(tag)x")
        let file = directory.path + "/one.toml"
        try "[[device]]\nname = \"x\"\nsocket = \"\(directory.path)/x.sock\"\ntap = \"vut\(tag)x\"\n".write(toFile: file, atomically: true, encoding: .utf8)
        let result = try runProgram("/usr/sbin/ip", ["netns", "exec", namespace.name, daemon, "--config", file], timeout: 30)
        #expect(result.status != 0)
        #expect(result.error.contains("no device could start"), "\(result.error)")
    }

    @Test("A TAP deleted under a connected frontend: logged, the frontend dropped, the TAP made again (retried while its name is taken) and the device served on it",
          .enabled(if: isRoot && ipAvailable, "needs root and iproute2"))
    func tapDeletedAndMadeAgain() throws {
        _ = try #require(daemonPath)
        let namespace = try TestNamespace()
        defer { namespace.delete() }
        let directory = try TemporaryDirectory("vu-daemon")
        defer { directory.remove() }
        let tag = String(getpid() % 100_000)
        let tap = "vut\(tag)r"
        let socket = directory.path + "/r.sock"
        let mac = MACAddress(0x52, 0x54, 0x00, 0x00, 0xaa, 0x07)
        let text = """
        [[device]]
        name = "r"
        socket = "\(socket)"
        tap = "\(tap)"
        mtu = 4000
        mac = "\(mac)"
        """
        let daemon = try DaemonProcess(namespace: namespace, configuration: text, directory: directory.path)
        defer { daemon.kill9() }
        #expect(eventually(timeout: 30) { access(socket, F_OK) == 0 || !daemon.process.isRunning })
        try #require(daemon.process.isRunning, "\(daemon.log)")
        let frontend = try Frontend.connect(path: socket)
        _ = try frontend.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))

        // Deleted, and its name taken by a veth before the daemon can look: the daemon is stopped
        // meanwhile, so it finds both at once and cannot make the TAP again yet.
        let pid = daemon.process.processIdentifier
        kill(pid, SIGSTOP)
        let deleted = ipSucceeds("-n", namespace.name, "link", "del", tap)
        let taken = ipSucceeds("-n", namespace.name, "link", "add", tap, "type", "veth", "peer", "name", "vup\(tag)r")
        kill(pid, SIGCONT)
        try #require(deleted && taken, "ip link del / add veth")
        #expect(eventually(timeout: 20) { daemon.log.contains("TAP is gone") }, "\(daemon.log)")
        #expect(frontend.waitForClose(timeout: 20), "the frontend is dropped")
        #expect(eventually(timeout: 20) { daemon.log.contains("device cannot start again") }, "\(daemon.log)")
        let failure = daemon.log.split(separator: "\n").first { $0.contains("device cannot start again") }.map(String.init) ?? ""
        #expect(failure.contains("not a TAP") && failure.contains("retry_in"), "the log says why and when it tries again: \(failure)")
        #expect(daemon.process.isRunning)

        // The name is free again: the next attempt makes the TAP, with the configured MTU, up.
        try ip("-n", namespace.name, "link", "del", tap)
        #expect(eventually(timeout: 60) { daemon.log.contains("device restarted on a new TAP") }, "\(daemon.log)")
        let details = try ip("-n", namespace.name, "-d", "link", "show", tap)
        #expect(details.contains("tun type tap") && details.contains("mtu 4000") && details.contains(",UP"), "\(details)")

        // A new frontend gets ARP answers through the new TAP.
        try ip("-n", namespace.name, "addr", "add", "198.18.0.1/24", "dev", tap)
        let next = try Frontend.connect(path: socket, timeout: 10)
        let guest = try next.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
        guest.postReceiveBuffers(pair: 0, count: 64)
        let request = arpRequest(from: mac, senderIP: [198, 18, 0, 2], targetIP: [198, 18, 0, 1])
        var replies = 0
        let deadline = monotonicNow() + 20
        while replies == 0 && monotonicNow() < deadline {
            #expect(guest.transmit(request))
            guest.waitUntil(timeout: 1) {
                replies += guest.receivedFrames(pair: 0).filter { isARPReply($0, to: mac, from: [198, 18, 0, 1]) }.count
                return replies > 0
            }
            _ = guest.completedTransmits()
        }
        #expect(replies > 0, "an ARP reply came back through the new TAP")

        #expect(daemon.terminate() == 0, "\(daemon.log)")
        #expect(eventually { !ipSucceeds("-n", namespace.name, "link", "show", tap) }, "the TAP it made is deleted at exit")
    }

    @Test("A single-queue TAP that another process still holds (as a killed daemon does for a moment) is waited for, then served",
          .enabled(if: isRoot && ipAvailable, "needs root and iproute2"))
    func busyTAPIsWaitedFor() throws {
        _ = try #require(daemonPath)
        let namespace = try TestNamespace()
        defer { namespace.delete() }
        let directory = try TemporaryDirectory("vu-daemon")
        defer { directory.remove() }
        let tag = String(getpid() % 100_000)
        let tap = "vut\(tag)w"
        let socket = directory.path + "/w.sock"
        try ip("-n", namespace.name, "tuntap", "add", tap, "mode", "tap", "vnet_hdr")
        // This process holds the TAP's one queue.
        let holder = Mutex<TapBackend?>(try namespace.run { try TapBackend(name: tap) })
        let daemon = try DaemonProcess(namespace: namespace, configuration: "[[device]]\nname = \"w\"\nsocket = \"\(socket)\"\ntap = \"\(tap)\"\n",
                                       directory: directory.path)
        defer { daemon.kill9() }
        #expect(eventually(timeout: 30) { daemon.log.contains("TAP busy") || !daemon.process.isRunning }, "\(daemon.log)")
        #expect(daemon.process.isRunning && access(socket, F_OK) != 0, "it waits: \(daemon.log)")
        holder.withLock { $0 = nil }
        #expect(eventually(timeout: 30) { access(socket, F_OK) == 0 }, "\(daemon.log)")
        #expect(daemon.log.contains("TAP attached after waiting"), "\(daemon.log)")
        let frontend = try Frontend.connect(path: socket)
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(regionSize: 4 << 20))
        let before = try namespace.packetCounters(tap)
        #expect(guest.transmit(ethernetFrame(length: 60, destination: .broadcast)))
        #expect(eventually { ((try? namespace.packetCounters(tap).rx) ?? 0) > before.rx })
        #expect(daemon.terminate() == 0, "\(daemon.log)")
    }
}
