#if canImport(Glibc)
import Glibc
#endif
import Foundation
import GuestMemory
import Logging
import Synchronization
import Testing
import Sys
import VhostUser
import VirtioNet
import VirtioNetTestSupport

typealias Frontend = SimulatedVhostUserFrontend
typealias LE = LittleEndian

let deviceMAC = MACAddress(0x52, 0x54, 0x00, 0x12, 0x34, 0x56)
let peerMAC = MACAddress(0x52, 0x54, 0x00, 0x00, 0x00, 0x02)

/// A logger that drops everything (the code under test logs refusals at error level on purpose).
let quietLogger = Logger(label: "daemon-tests", factory: { _ in SwiftLogNoOpLogHandler() })

/// Keeps what is logged through its loggers, to check that something was logged, at which level and
/// with which metadata.
final class LogCapture: Sendable {
    struct Record: Sendable {
        var level: Logger.Level
        var message: String
        var metadata: [String: String]
    }
    private let stored = Mutex<[Record]>([])

    var records: [Record] { stored.withLock { $0 } }

    /// A logger (everything from trace up) whose records land here, with `metadata` on each.
    func logger(metadata: [String: String] = [:]) -> Logger {
        var logger = Logger(label: "daemon-tests-capture") { _ in Handler(capture: self) }
        logger.logLevel = .trace
        for (key, value) in metadata { logger[metadataKey: key] = "\(value)" }
        return logger
    }

    fileprivate func append(_ record: Record) { stored.withLock { $0.append(record) } }

    private struct Handler: LogHandler {
        let capture: LogCapture
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            var all: [String: String] = [:]
            for (key, value) in metadata { all[key] = "\(value)" }
            for (key, value) in event.metadata ?? [:] { all[key] = "\(value)" }
            capture.append(Record(level: event.level, message: "\(event.message)", metadata: all))
        }
    }
}

/// An Ethernet frame of exactly `length` bytes (>= 14) with a payload recognisable by `seed`.
func ethernetFrame(length: Int, destination: MACAddress = deviceMAC, source: MACAddress = peerMAC, seed: UInt8 = 0) -> [UInt8] {
    var frame = destination.array + source.array + [0x08, 0x00]
    for index in 0..<(length - 14) { frame.append(UInt8(truncatingIfNeeded: index &* 7 &+ Int(seed))) }
    return frame
}

func monotonicNow() -> Double {
    var time = timespec()
    clock_gettime(CLOCK_MONOTONIC, &time)
    return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
}

/// Polls `condition` (every 5 ms) until it holds or `timeout` seconds pass; returns whether it held.
@discardableResult
func eventually(timeout: Double = 10, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicNow() + timeout
    while true {
        if condition() { return true }
        if monotonicNow() > deadline { return false }
        _ = poll(nil, 0, 5)
    }
}

/// A /proc file read to its end. /proc files report a size of 0, and Foundation's
/// `String(contentsOfFile:)` then returns only their first 4 KiB.
func readProcFile(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var data: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        if count < 0 && errno == EINTR { continue }
        guard count > 0 else { break }
        data += buffer.prefix(count)
    }
    return String(decoding: data, as: UTF8.self)
}

/// A directory of its own under /tmp, removed with everything in it by `remove()`.
final class TemporaryDirectory: Sendable {
    let path: String
    init(_ prefix: String = "vu-test") throws {
        var template = Array("/tmp/\(prefix)-XXXXXX".utf8CString)
        guard let result = mkdtemp(&template) else { throw SystemError(call: "mkdtemp", code: errno) }
        path = String(cString: result)
    }
    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

/// A `NetDevice` on a `LoopbackBackend` behind a `VhostUserService` in server mode, on a socket path
/// of its own under a temporary directory.
final class ServedDevice: Sendable {
    let backend: LoopbackBackend
    let device: NetDevice
    let service: VhostUserService
    let directory: TemporaryDirectory
    var path: String { service.path }

    init(queuePairs: Int = 1, mtu: Int = 1500, maximumQueueSize: Int = 256, mac: MACAddress = deviceMAC,
         handshakeTimeout: Duration = .seconds(10), logger: Logger = quietLogger,
         memoryLimit: UInt64 = VhostUserBackend.defaultMemoryLimit) throws {
        directory = try TemporaryDirectory()
        backend = try LoopbackBackend(queuePairs: queuePairs)
        device = try NetDevice(configuration: NetConfiguration(mac: mac, mtu: mtu, queuePairs: queuePairs, maximumQueueSize: maximumQueueSize),
                               backend: backend, logger: logger)
        service = try VhostUserService(path: directory.path + "/vhost.sock", mode: .server, device: device, logger: logger,
                                       handshakeTimeout: handshakeTimeout, memoryLimit: memoryLimit)
        try service.start()
    }

    func connect() throws -> Frontend { try Frontend.connect(path: path) }

    func stop() {
        service.stop()
        directory.remove()
    }
}

/// Features a frontend acknowledges by default: all offered. (`negotiate` adds bit 30 itself.)
let allFeatures: UInt64 = ~0

/// Sends frames of `sizes` on `pair` and checks each comes back intact on the same pair.
func roundTrip(_ guest: SimulatedVhostUserGuest, pair: Int = 0, sizes: [Int], seed: UInt8 = 0,
               sourceLocation: SourceLocation = #_sourceLocation) -> Bool {
    guest.postReceiveBuffers(pair: pair, count: sizes.count, size: 2048)
    let frames = sizes.enumerated().map { ethernetFrame(length: $1, seed: seed &+ UInt8(truncatingIfNeeded: $0)) }
    for frame in frames {
        guard guest.transmit(frame, pair: pair) else {
            Issue.record("TX ring of pair \(pair) is full", sourceLocation: sourceLocation)
            return false
        }
    }
    let received = guest.receive(count: frames.count, pair: pair, timeout: 15)
    _ = guest.completedTransmits(pair: pair)
    guard received == frames else {
        Issue.record("pair \(pair): sent \(frames.map(\.count)), received \(received.map(\.count))", sourceLocation: sourceLocation)
        return false
    }
    return true
}

/// Is the message refused? An error ack (non-zero u64 payload) or a closed connection.
func isRefusal(_ outcome: Frontend.Outcome) -> Bool {
    switch outcome {
    case .closed: true
    case .reply(let reply): reply.flags & Frontend.replyFlag != 0 && reply.u64.map { $0 != 0 } ?? false
    case .timedOut, .noAnswer: false
    }
}

/// Is it an error ack (the connection stays up)?
func isErrorAck(_ outcome: Frontend.Outcome) -> Bool {
    if case .reply(let reply) = outcome, reply.flags == Frontend.version | Frontend.replyFlag, let value = reply.u64, value != 0 { return true }
    return false
}

func isSuccessAck(_ outcome: Frontend.Outcome) -> Bool {
    if case .reply(let reply) = outcome, reply.flags == Frontend.version | Frontend.replyFlag, reply.u64 == 0 { return true }
    return false
}

// MARK: Descriptors

/// A memfd with a name unique to this process and run, so /proc/self/fd tells whether any copy of it
/// (such as one received by the backend) is still open.
final class ProbeFD: @unchecked Sendable {
    private static let counter = Atomic<Int>(0)
    let name: String
    private var fd: OwnedFileDescriptor?
    var rawValue: Int32

    init(size: Int = 1 << 20) throws {
        name = "vu-probe-\(getpid())-\(Self.counter.add(1, ordering: .relaxed).newValue)-\(UInt32.random(in: 0...UInt32.max))"
        let owned = try MemFD.create(name: name, size: size)
        rawValue = owned.rawValue
        fd = .some(owned)
    }

    /// Closes this process's own copy (what the test holds).
    func closeOwn() { fd = nil }

    /// Open descriptors of this process that refer to the memfd.
    var openCopies: Int { Self.openDescriptors(named: name) }

    static func openDescriptors(named name: String) -> Int {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") else { return -1 }
        var count = 0
        for entry in entries {
            if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(entry)"), target.contains(name + " ") || target.hasSuffix(name) {
                count += 1
            }
        }
        return count
    }
}
