import CVirtioShim
import Foundation
import Synchronization

/// A network namespace made for one test, so nothing the test does touches the root namespace.
///
/// `ip netns add` creates it under a name unique to this run; ``run(_:)`` executes work on a fresh
/// thread that has entered it (TAP creation, sockets, interface ioctls and /proc/sys/net writes act in
/// the calling thread's namespace); ``ip(_:)`` runs `ip -n NAME ...`; ``delete()`` removes it.
/// ``with(_:)`` wraps the whole lifetime and deletes the namespace even when the body throws.
///
/// Descriptors opened inside (TAPs, sockets) keep the namespace alive after deletion until they
/// close; its interfaces then go with it, never into the root namespace.
public final class NetworkNamespace: Sendable {
    public let name: String

    private static let counter = Atomic<Int>(0)

    /// Creates a namespace named "vnt-PID-N".
    public init() throws {
        let number = Self.counter.add(1, ordering: .relaxed).newValue
        name = "vnt-\(getpid())-\(number)"
        try Command.run(Command.ip, ["netns", "add", name])
    }

    /// Creates a namespace, passes it to `body`, and deletes it afterwards, also on failure.
    public static func with<Result>(_ body: (NetworkNamespace) async throws -> Result) async throws -> Result {
        let namespace = try NetworkNamespace()
        defer { namespace.delete() }
        return try await body(namespace)
    }

    /// The bind mount `ip netns` keeps for the namespace.
    public var path: String { "/run/netns/\(name)" }

    /// Runs `body` on a new thread inside the namespace and returns its result. The thread ends with
    /// the body, so no thread of the test process stays in the namespace. Sockets made in `body`
    /// stay in the namespace wherever they are used afterwards.
    public func run<Result: Sendable>(_ body: @escaping @Sendable () throws -> Result) async throws -> Result {
        let path = self.path
        return try await withCheckedThrowingContinuation { continuation in
            let thread = Thread {
                do {
                    try Self.enter(path: path)
                    continuation.resume(returning: try body())
                } catch {
                    continuation.resume(throwing: error)
                }
            }
            thread.name = "netns \(name)"
            thread.start()
        }
    }

    /// `ip -n NAME arguments...`; the output (stdout and stderr) on success.
    @discardableResult
    public func ip(_ arguments: String...) throws -> String {
        try ip(arguments: arguments)
    }

    @discardableResult
    public func ip(arguments: [String]) throws -> String {
        try Command.run(Command.ip, ["-n", name] + arguments)
    }

    /// `ip netns exec NAME command...`, for tools without a namespace option (ethtool).
    @discardableResult
    public func exec(_ command: String...) throws -> String {
        try Command.run(Command.ip, ["netns", "exec", name] + command)
    }

    /// Sets sysctls of this namespace, e.g. `["net/ipv6/conf/default/accept_dad": "0"]` (paths under
    /// /proc/sys), written from a thread inside it.
    public func sysctl(_ settings: [String: String]) async throws {
        try await run {
            for (key, value) in settings.sorted(by: { $0.key < $1.key }) {
                try Sysctl.set(key, value)
            }
        }
    }

    /// Removes the namespace; failures are reported on stderr, not thrown, as this runs in cleanup.
    public func delete() {
        do {
            try Command.run(Command.ip, ["netns", "delete", name])
        } catch {
            FileHandle.standardError.write(Data("cleanup: \(error)\n".utf8))
        }
    }

    /// Moves the calling thread into the namespace at `path`.
    private static func enter(path: String) throws {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw NamespaceError.enter(path: path, errno: errno) }
        defer { close(fd) }
        guard cvs_setns(fd, CVS_CLONE_NEWNET) == 0 else { throw NamespaceError.enter(path: path, errno: errno) }
    }
}

public enum NamespaceError: Error, CustomStringConvertible {
    case enter(path: String, errno: Int32)
    case sysctl(key: String, errno: Int32)

    public var description: String {
        switch self {
        case .enter(let path, let code): "setns(\(path)): \(String(cString: strerror(code)))"
        case .sysctl(let key, let code): "sysctl \(key): \(String(cString: strerror(code)))"
        }
    }
}

/// /proc/sys writes. Everything under net/ acts in the calling thread's network namespace.
public enum Sysctl {
    /// Writes `value` to /proc/sys/`key` (a path such as "net/ipv6/conf/all/disable_ipv6").
    public static func set(_ key: String, _ value: String) throws {
        let fd = open("/proc/sys/\(key)", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw NamespaceError.sysctl(key: key, errno: errno) }
        defer { close(fd) }
        let written = value.withCString { Glibc.write(fd, $0, strlen($0)) }
        guard written >= 0 else { throw NamespaceError.sysctl(key: key, errno: errno) }
    }

    /// Turns IPv6 off for interfaces created afterwards in the calling thread's namespace, so the
    /// kernel sends no router solicitations or MLD reports. Best effort: tests filter frames anyway.
    public static func disableIPv6InCurrentNamespace() {
        for key in ["net/ipv6/conf/default/disable_ipv6", "net/ipv6/conf/all/disable_ipv6"] {
            try? set(key, "1")
        }
    }
}

/// Runs external tools (`ip`, `ethtool`) and reports their output when they fail.
public enum Command {
    public struct Failure: Error, CustomStringConvertible {
        public let command: [String]
        public let status: Int32
        public let output: String
        public var description: String { "\(command.joined(separator: " ")) exited \(status): \(output)" }
    }

    /// The `ip` binary; /usr/sbin may be missing from PATH under a test runner.
    public static let ip: String = find("ip")
    /// The `ethtool` binary (Debian's package ethtool, installed by scripts/install-deps).
    public static let ethtool: String = find("ethtool")

    /// The first of the usual system directories that holds an executable `tool`, or the bare name.
    public static func find(_ tool: String) -> String {
        let candidates = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map { "\($0)/\(tool)" }
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? tool
    }

    /// Runs `executable arguments...` and returns stdout and stderr together; throws on a non-zero exit.
    @discardableResult
    public static func run(_ executable: String, _ arguments: [String]) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        process.standardInput = FileHandle.nullDevice
        try process.run()
        // Read to end of file before waiting, so a chatty child cannot block on a full pipe.
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let output = String(decoding: data, as: UTF8.self)
        guard process.terminationStatus == 0 else {
            throw Failure(command: [executable] + arguments, status: process.terminationStatus, output: output)
        }
        return output
    }
}

/// Waiting for a condition without deciding anything by a fixed sleep: the condition is re-checked
/// until it holds or the deadline passes.
public enum Wait {
    /// Polls `condition` every `interval` until it holds (true) or `timeout` passes (false).
    @discardableResult
    public static func until(timeout: Duration = .seconds(10), interval: Duration = .milliseconds(5),
                             _ condition: () throws -> Bool) rethrows -> Bool {
        let clock = ContinuousClock()
        let end = clock.now.advanced(by: timeout)
        while true {
            if try condition() { return true }
            if clock.now >= end { return false }
            let (seconds, attoseconds) = interval.components
            var pause = timespec(tv_sec: Int(seconds), tv_nsec: Int(attoseconds / 1_000_000_000))
            _ = nanosleep(&pause, nil)
        }
    }
}
