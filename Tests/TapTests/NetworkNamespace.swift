import Foundation
import CVirtioShim
import Synchronization

/// A network namespace made for one test, so nothing the test does touches the root namespace.
///
/// `ip netns add` creates it under a name unique to this run; ``run(_:)`` executes work on a fresh
/// thread that has entered it (TAP creation, sockets and interface ioctls act in the calling thread's
/// namespace); ``ip(_:)`` runs `ip -n NAME ...`; ``delete()`` removes it. ``with(_:)`` wraps the
/// whole lifetime and deletes the namespace even when the body throws.
///
/// Descriptors opened inside (TAPs, sockets) keep the namespace alive after deletion until they
/// close; its interfaces then go with it, never into the root namespace.
final class NetworkNamespace: Sendable {
    let name: String

    private static let counter = Atomic<Int>(0)

    /// Creates a namespace named "vnt-PID-N".
    init() throws {
        let number = Self.counter.add(1, ordering: .relaxed).newValue
        name = "vnt-\(getpid())-\(number)"
        try Command.run(Command.ip, ["netns", "add", name])
    }

    /// Creates a namespace, passes it to `body`, and deletes it afterwards, also on failure.
    static func with<Result>(_ body: (NetworkNamespace) async throws -> Result) async throws -> Result {
        let namespace = try NetworkNamespace()
        defer { namespace.delete() }
        return try await body(namespace)
    }

    /// Runs `body` on a new thread inside the namespace and returns its result. The thread ends with
    /// the body, so no thread of the test process stays in the namespace.
    func run<Result: Sendable>(_ body: @escaping @Sendable () throws -> Result) async throws -> Result {
        let path = "/run/netns/\(name)"
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
    func ip(_ arguments: String...) throws -> String {
        try Command.run(Command.ip, ["-n", name] + arguments)
    }

    /// `ip netns exec NAME command...`, for tools without a namespace option.
    @discardableResult
    func exec(_ command: String...) throws -> String {
        try Command.run(Command.ip, ["netns", "exec", name] + command)
    }

    /// Removes the namespace; failures are reported on stderr, not thrown, as this runs in cleanup.
    func delete() {
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

enum NamespaceError: Error, CustomStringConvertible {
    case enter(path: String, errno: Int32)

    var description: String {
        switch self {
        case .enter(let path, let code): "setns(\(path)): \(String(cString: strerror(code)))"
        }
    }
}

/// Runs external tools (`ip`) and reports their output when they fail.
enum Command {
    struct Failure: Error, CustomStringConvertible {
        let command: [String]
        let status: Int32
        let output: String
        var description: String { "\(command.joined(separator: " ")) exited \(status): \(output)" }
    }

    /// The `ip` binary; /usr/sbin may be missing from PATH under a test runner.
    static let ip: String = {
        let candidates = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? "ip"
    }()

    /// Runs `executable arguments...` and returns stdout and stderr together; throws on a non-zero exit.
    @discardableResult
    static func run(_ executable: String, _ arguments: [String]) throws -> String {
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
