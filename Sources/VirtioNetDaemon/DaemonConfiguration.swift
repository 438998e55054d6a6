import Foundation
import Logging
import Tap
import TOMLKit
import VhostUser
import VirtioNet
import Virtqueue

/// One `[[device]]` of the configuration file.
public struct DeviceConfiguration: Equatable, Sendable {
    public var name: String
    public var socket: String
    public var mode: VhostUserService.Mode
    public var tap: String
    public var queuePairs: Int
    public var queueSize: Int
    public var mac: MACAddress
    public var mtu: Int
    /// nil: every offload the TAP supports.
    public var offloads: OffloadSet?
    /// The most guest memory a frontend may map for this device, in bytes.
    public var maximumGuestMemory: UInt64 = VhostUserBackend.defaultMemoryLimit
    /// How long a new connection has to send its first complete message, and any message to arrive
    /// whole once its first byte came; a connection that takes longer is dropped.
    public var handshakeTimeout: Duration = DeviceConfiguration.defaultHandshakeTimeout

    public static let defaultHandshakeTimeout = Duration.seconds(10)
    /// `handshake_timeout_ms` is accepted in this range.
    public static let handshakeTimeoutRange = 100...3_600_000
}

/// The whole configuration file: `[daemon]` and one or more `[[device]]`.
public struct DaemonConfiguration: Equatable, Sendable {
    public var logLevel: Logger.Level
    /// HOST:PORT of the Prometheus endpoint, on loopback.
    public var metrics: (host: String, port: UInt16)?
    public var devices: [DeviceConfiguration]

    public static func == (lhs: Self, rhs: Self) -> Bool {
        lhs.logLevel == rhs.logLevel && lhs.devices == rhs.devices
            && lhs.metrics?.host == rhs.metrics?.host && lhs.metrics?.port == rhs.metrics?.port
    }

    public static let offloadNames: [String: OffloadSet] = [
        "csum": .csum, "tso4": .tso4, "tso6": .tso6, "ecn": .ecn, "ufo": .ufo, "uso": .uso,
    ]

    /// Reads and validates `path`. Errors name the file, the line and the key.
    public static func load(path: String) throws(ConfigurationError) -> DaemonConfiguration {
        let text: String
        do { text = try String(contentsOfFile: path, encoding: .utf8) } catch {
            throw ConfigurationError(file: path, line: nil, key: nil, message: "cannot read the file: \(error.localizedDescription)")
        }
        return try parse(text, file: path)
    }

    /// Parses configuration text; `file` names it in errors.
    public static func parse(_ text: String, file: String) throws(ConfigurationError) -> DaemonConfiguration {
        let table: TOMLTable
        do { table = try TOMLTable(string: text) } catch let error as TOMLParseError {
            throw ConfigurationError(file: file, line: error.source.begin.line, key: nil, message: "not valid TOML: \(error.description)")
        } catch {
            throw ConfigurationError(file: file, line: nil, key: nil, message: "not valid TOML: \(error)")
        }
        let lines = KeyLines(text)
        func fail(_ key: String, table: String, index: Int? = nil, _ message: String) -> ConfigurationError {
            let shown = index.map { "\(table)[\($0)].\(key)" } ?? (table.isEmpty ? key : "\(table).\(key)")
            return ConfigurationError(file: file, line: lines.line(of: key, in: table, index: index), key: shown, message: message)
        }

        for key in table.keys where key != "daemon" && key != "device" {
            throw fail(key, table: "", "unknown key (expected [daemon] or [[device]])")
        }

        // [daemon]
        var logLevel = Logger.Level.info
        var metrics: (String, UInt16)? = nil
        if let value = table["daemon"] {
            guard let daemon = value.table else { throw fail("daemon", table: "", "must be a table ([daemon])") }
            for key in daemon.keys where !["log_level", "metrics"].contains(key) {
                throw fail(key, table: "daemon", "unknown key (expected log_level or metrics)")
            }
            if let value = daemon["log_level"] {
                guard let string = value.string else { throw fail("log_level", table: "daemon", "must be a string, not \(value.type)") }
                guard let level = Logger.Level(rawValue: string) else {
                    throw fail("log_level", table: "daemon", "\"\(string)\" is not one of trace, debug, info, notice, warning, error, critical")
                }
                logLevel = level
            }
            if let value = daemon["metrics"] {
                guard let string = value.string else { throw fail("metrics", table: "daemon", "must be a string \"HOST:PORT\", not \(value.type)") }
                guard let endpoint = parseEndpoint(string) else {
                    throw fail("metrics", table: "daemon", "\"\(string)\" is not HOST:PORT on loopback (127.0.0.0/8, localhost or [::1]) with a port in 1...65535")
                }
                metrics = endpoint
            }
        }

        // [[device]]
        guard let deviceValue = table["device"] else {
            throw ConfigurationError(file: file, line: nil, key: "device", message: "no [[device]] is configured")
        }
        guard let deviceArray = deviceValue.array else { throw fail("device", table: "", "must be an array of tables ([[device]])") }
        var devices: [DeviceConfiguration] = []
        let allowed = ["name", "socket", "mode", "tap", "queue_pairs", "queue_size", "mac", "mtu", "offloads", "handshake_timeout_ms",
                       "max_guest_memory_gib"]
        for (index, element) in deviceArray.enumerated() {
            guard let device = element.table else { throw fail("device", table: "", index: index, "must be a table") }
            func invalid(_ key: String, _ message: String) -> ConfigurationError { fail(key, table: "device", index: index, message) }
            for key in device.keys where !allowed.contains(key) {
                throw invalid(key, "unknown key (expected one of \(allowed.joined(separator: ", ")))")
            }
            func string(_ key: String) throws(ConfigurationError) -> String? {
                guard let value = device[key] else { return nil }
                guard let string = value.string else { throw invalid(key, "must be a string, not \(value.type)") }
                return string
            }
            func integer(_ key: String) throws(ConfigurationError) -> Int? {
                guard let value = device[key] else { return nil }
                // Decoded as Int and range-checked here: fixed-width decoding in TOMLKit traps.
                guard let number = value.int else { throw invalid(key, "must be an integer, not \(value.type)") }
                return number
            }
            guard let name = try string("name"), !name.isEmpty else { throw invalid("name", "is required (a non-empty string)") }
            guard let socket = try string("socket"), !socket.isEmpty else { throw invalid("socket", "is required (the vhost-user socket path)") }
            guard socket.utf8.count < 108 else { throw invalid("socket", "path is longer than a unix socket allows (107 bytes)") }
            let modeName = try string("mode") ?? "server"
            guard let mode = VhostUserService.Mode(rawValue: modeName) else { throw invalid("mode", "\"\(modeName)\" is not \"server\" or \"client\"") }
            guard let tap = try string("tap"), !tap.isEmpty else { throw invalid("tap", "is required (the TAP interface name)") }
            do { try TapDevice.validate(name: tap) } catch {
                throw invalid("tap", "\"\(tap)\" is not a valid interface name (1 to 15 bytes, not . or .., no '/', ':' or white space)")
            }
            let queuePairs = try integer("queue_pairs") ?? 1
            let pairLimit = min(NetConfiguration.maximumQueuePairs, VhostUserBackend.maximumQueuePairs)
            guard (1...pairLimit).contains(queuePairs) else { throw invalid("queue_pairs", "\(queuePairs) is outside 1...\(pairLimit)") }
            let queueSize = try integer("queue_size") ?? 256
            guard SplitQueue.isValidSize(queueSize) else {
                throw invalid("queue_size", "\(queueSize) is not a power of two in 1...\(SplitQueue.maximumSize)")
            }
            let mac: MACAddress
            if let text = try string("mac") {
                guard let parsed = MACAddress(string: text) else { throw invalid("mac", "\"\(text)\" is not a MAC address like \"52:54:00:12:34:56\"") }
                guard !parsed.isMulticast else { throw invalid("mac", "\(text) is a multicast address") }
                mac = parsed
            } else {
                mac = defaultMAC(for: name)
            }
            let mtu = try integer("mtu") ?? 1500
            guard (NetConfiguration.minimumMTU...NetConfiguration.maximumMTU).contains(mtu) else {
                throw invalid("mtu", "\(mtu) is outside \(NetConfiguration.minimumMTU)...\(NetConfiguration.maximumMTU)")
            }
            var offloads: OffloadSet? = nil
            if let value = device["offloads"] {
                guard let array = value.array else { throw invalid("offloads", "must be an array of strings, not \(value.type)") }
                var set: OffloadSet = []
                for item in array {
                    guard let name = item.string, let offload = offloadNames[name] else {
                        throw invalid("offloads", "\(item.string.map { "\"\($0)\"" } ?? "a \(item.type)") is not one of \(offloadNames.keys.sorted().joined(separator: ", "))")
                    }
                    set.insert(offload)
                }
                if !set.isEmpty && !set.contains(.csum) { throw invalid("offloads", "every offload needs \"csum\"") }
                offloads = set
            }
            let memoryGiB = try integer("max_guest_memory_gib") ?? Int(VhostUserBackend.defaultMemoryLimit >> 30)
            guard (1...Self.maximumGuestMemoryGiB).contains(memoryGiB) else {
                throw invalid("max_guest_memory_gib", "\(memoryGiB) is outside 1...\(Self.maximumGuestMemoryGiB)")
            }
            let handshakeMilliseconds = try integer("handshake_timeout_ms") ?? Int(DeviceConfiguration.defaultHandshakeTimeout.components.seconds * 1000)
            guard DeviceConfiguration.handshakeTimeoutRange.contains(handshakeMilliseconds) else {
                let range = DeviceConfiguration.handshakeTimeoutRange
                throw invalid("handshake_timeout_ms", "\(handshakeMilliseconds) is outside \(range.lowerBound)...\(range.upperBound) (milliseconds)")
            }
            devices.append(DeviceConfiguration(name: name, socket: socket, mode: mode, tap: tap, queuePairs: queuePairs,
                                               queueSize: queueSize, mac: mac, mtu: mtu, offloads: offloads,
                                               maximumGuestMemory: UInt64(memoryGiB) << 30,
                                               handshakeTimeout: .milliseconds(handshakeMilliseconds)))
        }
        for (index, device) in devices.enumerated() {
            for earlier in devices[..<index] {
                if earlier.name == device.name { throw fail("name", table: "device", index: index, "\"\(device.name)\" is used by another device") }
                if earlier.socket == device.socket { throw fail("socket", table: "device", index: index, "\"\(device.socket)\" is used by another device") }
                if earlier.tap == device.tap { throw fail("tap", table: "device", index: index, "\"\(device.tap)\" is used by another device") }
            }
        }
        return DaemonConfiguration(logLevel: logLevel, metrics: metrics, devices: devices)
    }

    /// The largest `max_guest_memory_gib`: 64 TiB, half of x86-64's user address space.
    static let maximumGuestMemoryGiB = 64 << 10

    /// "127.0.0.1:9464", "localhost:9464", "[::1]:9464"; loopback only.
    static func parseEndpoint(_ text: String) -> (String, UInt16)? {
        guard let colon = text.lastIndex(of: ":") else { return nil }
        var host = String(text[..<colon])
        let portText = text[text.index(after: colon)...]
        guard portText.allSatisfy(\.isASCII), portText.allSatisfy(\.isNumber), let port = UInt16(portText), port > 0 else { return nil }
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        if host == "localhost" || host == "::1" { return (host, port) }
        let parts = host.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 4, parts.allSatisfy({ UInt8($0) != nil }), parts[0] == "127" else { return nil }
        return (host, port)
    }

    /// A stable locally administered-looking address in QEMU's 52:54:00 range, from the name.
    static func defaultMAC(for name: String) -> MACAddress {
        var hash: UInt32 = 2166136261
        for byte in name.utf8 { hash = (hash ^ UInt32(byte)) &* 16777619 }
        return MACAddress(0x52, 0x54, 0x00, UInt8(truncatingIfNeeded: hash >> 16), UInt8(truncatingIfNeeded: hash >> 8), UInt8(truncatingIfNeeded: hash))
    }
}

/// A configuration problem, with where it is.
public struct ConfigurationError: Error, CustomStringConvertible, Equatable, Sendable {
    public var file: String
    public var line: Int?
    public var key: String?
    public var message: String

    public var description: String {
        var location = file
        if let line { location += ":\(line)" }
        if let key { return "\(location): \(key): \(message)" }
        return "\(location): \(message)"
    }
}

/// Where each key is written, so errors can name the line (TOMLKit keeps no positions for values).
struct KeyLines {
    private var lines: [String: Int] = [:]

    init(_ text: String) {
        var table = ""
        var index: Int? = nil
        var counts: [String: Int] = [:]
        // isNewline also takes "\r\n", which Swift treats as one Character.
        for (number, raw) in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.hasPrefix("[[") {
                table = line.dropFirst(2).prefix { $0 != "]" }.trimmingCharacters(in: .whitespaces)
                index = counts[table, default: 0]
                counts[table, default: 0] += 1
                lines[Self.id(table, index, nil)] = number + 1
            } else if line.hasPrefix("[") {
                table = line.dropFirst().prefix { $0 != "]" }.trimmingCharacters(in: .whitespaces)
                index = nil
                lines[Self.id(table, nil, nil)] = number + 1
            } else if let equals = line.firstIndex(of: "="), !line.hasPrefix("#") {
                let key = line[..<equals].trimmingCharacters(in: .whitespaces).trimmingCharacters(in: CharacterSet(charactersIn: "\"'"))
                if lines[Self.id(table, index, key)] == nil { lines[Self.id(table, index, key)] = number + 1 }
            }
        }
    }

    private static func id(_ table: String, _ index: Int?, _ key: String?) -> String {
        "\(table)#\(index.map(String.init) ?? "")#\(key ?? "")"
    }

    /// The line of `key` in `table` (the index-th `[[table]]`), else of the table header, else nil.
    func line(of key: String, in table: String, index: Int?) -> Int? {
        lines[Self.id(table, index, key)] ?? (table.isEmpty ? lines[Self.id(key, nil, nil)] ?? lines[Self.id(key, 0, nil)] : lines[Self.id(table, index, nil)])
    }
}
