import Foundation
import Testing
import VhostUser
import VirtioNet
import VirtioNetDaemon

/// The repository's root, from this file's path.
let packageRoot: String = {
    var url = URL(fileURLWithPath: #filePath)
    for _ in 0..<3 { url.deleteLastPathComponent() }
    return url.path
}()

/// A valid two-device configuration; the tests below change one line of it at a time.
/// Line numbers are shown on the right of each line.
let baseConfiguration = """
[daemon]
log_level = "debug"
metrics = "127.0.0.1:9464"

[[device]]
name = "a"
socket = "/run/vu/a.sock"
tap = "tapa"
queue_pairs = 2
queue_size = 512
mac = "52:54:00:00:00:0a"
mtu = 1500
offloads = ["csum", "tso4"]

[[device]]
name = "b"
socket = "/run/vu/b.sock"
mode = "client"
tap = "tapb"
mtu = 9000
"""
// 1 [daemon] / 2 log_level / 3 metrics / 4 blank / 5 [[device]] / 6 name / 7 socket / 8 tap /
// 9 queue_pairs / 10 queue_size / 11 mac / 12 mtu / 13 offloads / 14 blank / 15 [[device]] /
// 16 name / 17 socket / 18 mode / 19 tap / 20 mtu

/// `baseConfiguration` with line `line` (1-based) replaced by `text` (nil: removed, keeping the
/// numbering by leaving an empty line).
func configuration(replacing line: Int, with text: String?) -> String {
    var lines = baseConfiguration.components(separatedBy: "\n")
    lines[line - 1] = text ?? ""
    return lines.joined(separator: "\n")
}

func configuration(inserting text: String, after line: Int) -> String {
    var lines = baseConfiguration.components(separatedBy: "\n")
    lines.insert(text, at: line)
    return lines.joined(separator: "\n")
}

/// Parses `text`, expecting an error at `line` naming `key`; returns it.
@discardableResult
func expectError(_ text: String, line: Int?, key: String?, containing fragment: String? = nil,
                 sourceLocation: SourceLocation = #_sourceLocation) -> ConfigurationError? {
    do {
        _ = try DaemonConfiguration.parse(text, file: "/etc/virtio-netd/test.toml")
        Issue.record("accepted, expected an error at line \(line.map(String.init) ?? "-") for \(key ?? "-")", sourceLocation: sourceLocation)
        return nil
    } catch {
        #expect(error.file == "/etc/virtio-netd/test.toml", sourceLocation: sourceLocation)
        #expect(error.line == line, "line; the error: \(error)", sourceLocation: sourceLocation)
        #expect(error.key == key, "key; the error: \(error)", sourceLocation: sourceLocation)
        if let fragment {
            #expect(error.message.contains(fragment), "message: \(error.message)", sourceLocation: sourceLocation)
        }
        var prefix = "/etc/virtio-netd/test.toml"
        if let line { prefix += ":\(line)" }
        if let key { prefix += ": \(key):" }
        #expect(error.description.hasPrefix(prefix), "\(error.description)", sourceLocation: sourceLocation)
        return error
    }
}

@Suite("Daemon configuration: parsing and errors with file, line and key")
struct ConfigurationTests {
    @Test("config/virtio-netd.toml is accepted and means what its comments say")
    func exampleConfiguration() throws {
        let configuration = try DaemonConfiguration.load(path: packageRoot + "/config/virtio-netd.toml")
        #expect(configuration.logLevel == .info)
        #expect(configuration.metrics?.host == "127.0.0.1" && configuration.metrics?.port == 9464)
        #expect(configuration.devices.count == 1)
        let device = try #require(configuration.devices.first)
        #expect(device.name == "vm1-net0")
        #expect(device.socket == "/run/virtio-netd/vm1-net0.sock")
        #expect(device.mode == .server)
        #expect(device.tap == "vm1tap0")
        #expect(device.queuePairs == 2 && device.queueSize == 256)
        #expect(device.mac == MACAddress(string: "52:54:00:12:34:56"))
        #expect(device.mtu == 1500)
        #expect(device.offloads == [.csum, .tso4, .tso6, .ecn, .ufo])
    }

    @Test("The base configuration of these tests parses, with defaults where keys are left out")
    func baseConfigurationParses() throws {
        let configuration = try DaemonConfiguration.parse(baseConfiguration, file: "t.toml")
        #expect(configuration.logLevel == .debug)
        #expect(configuration.devices.map(\.name) == ["a", "b"])
        let b = configuration.devices[1]
        #expect(b.mode == .client && b.queuePairs == 1 && b.queueSize == 256 && b.mtu == 9000 && b.offloads == nil)
        #expect(configuration.devices[0].mode == .server, "server is the default mode")
        #expect(b.mac != configuration.devices[0].mac)
        #expect(b.mac.array.prefix(3) == [0x52, 0x54, 0x00], "a default MAC in QEMU's range")
        #expect(!b.mac.isMulticast)
        // Without [daemon] and metrics: defaults.
        let minimal = try DaemonConfiguration.parse("[[device]]\nname = \"x\"\nsocket = \"/s\"\ntap = \"t\"\n", file: "m.toml")
        #expect(minimal.logLevel == .info && minimal.metrics == nil && minimal.devices.count == 1)
    }

    @Test("Loopback metrics endpoints are accepted", arguments: ["127.0.0.1:9464", "127.1.2.3:1", "localhost:65535", "[::1]:9464"])
    func loopbackMetrics(_ endpoint: String) throws {
        let configuration = try DaemonConfiguration.parse(configuration(replacing: 3, with: "metrics = \"\(endpoint)\""), file: "t.toml")
        #expect(configuration.metrics != nil)
    }

    @Test("Unknown keys: in [daemon], in each [[device]], at the top level")
    func unknownKeys() {
        expectError(configuration(inserting: "colour = \"blue\"", after: 2), line: 3, key: "daemon.colour", containing: "unknown key")
        expectError(configuration(inserting: "speed = 10", after: 8), line: 9, key: "device[0].speed", containing: "unknown key")
        expectError(configuration(inserting: "speed = 10", after: 17), line: 18, key: "device[1].speed", containing: "unknown key")
        expectError("verbose = true\n" + baseConfiguration, line: 1, key: "verbose", containing: "unknown key")
        expectError(baseConfiguration + "\n[extra]\nx = 1\n", line: 21, key: "extra", containing: "unknown key")
    }

    @Test("Wrong types name the key and its line")
    func wrongTypes() {
        expectError(configuration(replacing: 12, with: "mtu = \"big\""), line: 12, key: "device[0].mtu", containing: "integer")
        expectError(configuration(replacing: 20, with: "mtu = 1500.5"), line: 20, key: "device[1].mtu", containing: "integer")
        expectError(configuration(replacing: 9, with: "queue_pairs = \"2\""), line: 9, key: "device[0].queue_pairs")
        expectError(configuration(replacing: 6, with: "name = 7"), line: 6, key: "device[0].name", containing: "string")
        expectError(configuration(replacing: 13, with: "offloads = \"csum\""), line: 13, key: "device[0].offloads", containing: "array")
        expectError(configuration(replacing: 13, with: "offloads = [\"csum\", 4]"), line: 13, key: "device[0].offloads")
        expectError(configuration(replacing: 2, with: "log_level = 3"), line: 2, key: "daemon.log_level", containing: "string")
        expectError(configuration(replacing: 3, with: "metrics = 9464"), line: 3, key: "daemon.metrics", containing: "string")
        expectError("daemon = 5\n[[device]]\nname = \"x\"\nsocket = \"/s\"\ntap = \"t\"\n", line: 1, key: "daemon", containing: "table")
        expectError("device = 5\n", line: 1, key: "device", containing: "array")
    }

    @Test("Out-of-range values")
    func outOfRange() {
        expectError(configuration(replacing: 12, with: "mtu = 70000"), line: 12, key: "device[0].mtu", containing: "70000")
        expectError(configuration(replacing: 20, with: "mtu = 67"), line: 20, key: "device[1].mtu")
        expectError(configuration(replacing: 12, with: "mtu = -1"), line: 12, key: "device[0].mtu")
        expectError(configuration(replacing: 9, with: "queue_pairs = 0"), line: 9, key: "device[0].queue_pairs", containing: "0")
        expectError(configuration(replacing: 9, with: "queue_pairs = 129"), line: 9, key: "device[0].queue_pairs", containing: "1...128")
        #expect(throws: Never.self) { try DaemonConfiguration.parse(configuration(replacing: 9, with: "queue_pairs = 128"), file: "t.toml") }
        expectError(configuration(replacing: 8, with: "tap = \"..\""), line: 8, key: "device[0].tap")
        expectError(configuration(replacing: 8, with: "tap = \"tap\\tx\""), line: 8, key: "device[0].tap")
        expectError(configuration(replacing: 10, with: "queue_size = 100"), line: 10, key: "device[0].queue_size", containing: "power of two")
        expectError(configuration(replacing: 10, with: "queue_size = 0"), line: 10, key: "device[0].queue_size")
        expectError(configuration(replacing: 10, with: "queue_size = 65536"), line: 10, key: "device[0].queue_size")
        expectError(configuration(replacing: 10, with: "queue_size = 9223372036854775807"), line: 10, key: "device[0].queue_size")
        expectError(configuration(replacing: 2, with: "log_level = \"loud\""), line: 2, key: "daemon.log_level")
        expectError(configuration(replacing: 18, with: "mode = \"peer\""), line: 18, key: "device[1].mode")
        expectError(configuration(replacing: 19, with: "tap = \"a-name-longer-than-15\""), line: 19, key: "device[1].tap")
        expectError(configuration(replacing: 19, with: "tap = \"tap/0\""), line: 19, key: "device[1].tap")
        expectError(configuration(replacing: 17, with: "socket = \"/\(String(repeating: "s", count: 120))\""), line: 17, key: "device[1].socket")
    }

    @Test("max_guest_memory_gib: 1 TiB by default, 1 to 65536 GiB, the edges accepted and one past them refused")
    func guestMemoryLimit() throws {
        let defaults = try DaemonConfiguration.parse(baseConfiguration, file: "t.toml")
        #expect(defaults.devices.map(\.maximumGuestMemory) == [1 << 40, 1 << 40])
        for (value, bytes) in [(1, UInt64(1) << 30), (65536, UInt64(1) << 46)] {
            let parsed = try DaemonConfiguration.parse(configuration(replacing: 13, with: "max_guest_memory_gib = \(value)"), file: "t.toml")
            #expect(parsed.devices[0].maximumGuestMemory == bytes)
        }
        expectError(configuration(replacing: 13, with: "max_guest_memory_gib = 0"), line: 13, key: "device[0].max_guest_memory_gib")
        expectError(configuration(replacing: 13, with: "max_guest_memory_gib = 65537"), line: 13, key: "device[0].max_guest_memory_gib")
        expectError(configuration(replacing: 13, with: "max_guest_memory_gib = \"1T\""), line: 13, key: "device[0].max_guest_memory_gib", containing: "integer")
    }

    @Test("handshake_timeout_ms: 10 s by default, per device, integer milliseconds in 100...3600000")
    func handshakeTimeout() throws {
        let base = try DaemonConfiguration.parse(baseConfiguration, file: "t.toml")
        #expect(base.devices.allSatisfy { $0.handshakeTimeout == .seconds(10) })
        let set = try DaemonConfiguration.parse(configuration(inserting: "handshake_timeout_ms = 2500", after: 8), file: "t.toml")
        #expect(set.devices[0].handshakeTimeout == .milliseconds(2500))
        #expect(set.devices[1].handshakeTimeout == .seconds(10), "set for one device only")
        let edges = try DaemonConfiguration.parse(configuration(inserting: "handshake_timeout_ms = 100", after: 8)
            .replacingOccurrences(of: "mode = \"client\"", with: "mode = \"client\"\nhandshake_timeout_ms = 3600000"), file: "t.toml")
        #expect(edges.devices.map(\.handshakeTimeout) == [.milliseconds(100), .seconds(3600)])
        expectError(configuration(inserting: "handshake_timeout_ms = 99", after: 8), line: 9, key: "device[0].handshake_timeout_ms", containing: "99 is outside")
        expectError(configuration(inserting: "handshake_timeout_ms = 3600001", after: 17), line: 18, key: "device[1].handshake_timeout_ms")
        expectError(configuration(inserting: "handshake_timeout_ms = -5", after: 8), line: 9, key: "device[0].handshake_timeout_ms")
        expectError(configuration(inserting: "handshake_timeout_ms = 9223372036854775807", after: 8), line: 9, key: "device[0].handshake_timeout_ms")
        expectError(configuration(inserting: "handshake_timeout_ms = \"10s\"", after: 8), line: 9, key: "device[0].handshake_timeout_ms", containing: "integer")
        expectError(configuration(inserting: "handshake_timeout_ms = 1.5", after: 8), line: 9, key: "device[0].handshake_timeout_ms", containing: "integer")
    }

    @Test("Bad MAC addresses")
    func badMAC() {
        for text in ["52:54:00:zz:00:01", "52:54:00:00:01", "52:54:00:00:00:01:02", "", "525400000001"] {
            expectError(configuration(replacing: 11, with: "mac = \"\(text)\""), line: 11, key: "device[0].mac", containing: "MAC")
        }
        expectError(configuration(replacing: 11, with: "mac = \"01:00:5e:00:00:01\""), line: 11, key: "device[0].mac", containing: "multicast")
    }

    @Test("Unknown offloads, and offloads without csum")
    func badOffloads() {
        expectError(configuration(replacing: 13, with: "offloads = [\"csum\", \"warp\"]"), line: 13, key: "device[0].offloads", containing: "warp")
        expectError(configuration(replacing: 13, with: "offloads = [\"tso4\"]"), line: 13, key: "device[0].offloads", containing: "csum")
        // Spread over several lines: the key's line is named.
        let multiline = configuration(replacing: 13, with: "offloads = [\n  \"csum\",\n  \"warp\",\n]")
        expectError(multiline, line: 13, key: "device[0].offloads")
        let none = try? DaemonConfiguration.parse(configuration(replacing: 13, with: "offloads = []"), file: "t.toml")
        #expect(none?.devices[0].offloads == [], "an empty list turns every offload off")
    }

    @Test("Duplicate names, sockets and TAPs name the second device")
    func duplicates() {
        expectError(configuration(replacing: 16, with: "name = \"a\""), line: 16, key: "device[1].name", containing: "another device")
        expectError(configuration(replacing: 17, with: "socket = \"/run/vu/a.sock\""), line: 17, key: "device[1].socket", containing: "another device")
        expectError(configuration(replacing: 19, with: "tap = \"tapa\""), line: 19, key: "device[1].tap", containing: "another device")
    }

    @Test("Metrics must be on loopback, with a port")
    func metricsNotOnLoopback() {
        for endpoint in ["0.0.0.0:9464", "192.168.1.1:9464", "10.0.0.1:80", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "example.com:9464", "[::]:9464", "128.0.0.1:9464", ":9464"] {
            expectError(configuration(replacing: 3, with: "metrics = \"\(endpoint)\""), line: 3, key: "daemon.metrics", containing: "loopback")
        }
    }

    @Test("Missing required keys name the device's [[device]] line")
    func missingKeys() {
        expectError(configuration(replacing: 6, with: nil), line: 5, key: "device[0].name", containing: "required")
        expectError(configuration(replacing: 7, with: nil), line: 5, key: "device[0].socket", containing: "required")
        expectError(configuration(replacing: 19, with: nil), line: 15, key: "device[1].tap", containing: "required")
        expectError(configuration(replacing: 6, with: "name = \"\""), line: 6, key: "device[0].name")
        expectError("[daemon]\nlog_level = \"info\"\n", line: nil, key: "device", containing: "no [[device]]")
    }

    @Test("Invalid TOML names the parser's line")
    func invalidTOML() {
        expectError(configuration(replacing: 12, with: "mtu = = 1500"), line: 12, key: nil, containing: "TOML")
        expectError(configuration(replacing: 15, with: "[[device]"), line: 15, key: nil, containing: "TOML")
        expectError(configuration(replacing: 7, with: "socket = \"/run/vu/a.sock"), line: 7, key: nil, containing: "TOML")
        expectError(configuration(inserting: "name = \"again\"", after: 6), line: 7, key: nil, containing: "TOML")
    }

    @Test("A file with CRLF line ends gets the same line numbers")
    func crlfLineNumbers() {
        let crlf = baseConfiguration.replacingOccurrences(of: "\n", with: "\r\n")
        expectError(crlf.replacingOccurrences(of: "mtu = 9000", with: "mtu = 99999"), line: 20, key: "device[1].mtu")
        expectError(crlf.replacingOccurrences(of: "queue_size = 512", with: "queue_size = 100"), line: 10, key: "device[0].queue_size")
        expectError(crlf.replacingOccurrences(of: "name = \"b\"", with: "name = \"a\""), line: 16, key: "device[1].name")
    }

    @Test("A file that cannot be read is named")
    func unreadableFile() {
        do {
            _ = try DaemonConfiguration.load(path: "/nonexistent/virtio-netd.toml")
            Issue.record("accepted a missing file")
        } catch {
            #expect(error.file == "/nonexistent/virtio-netd.toml")
            #expect(error.line == nil)
            #expect(error.description.hasPrefix("/nonexistent/virtio-netd.toml: "))
        }
    }
}
