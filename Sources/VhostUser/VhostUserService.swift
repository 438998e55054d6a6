#if canImport(Glibc)
import Glibc
#endif
import Logging
import Synchronization
import Sys
import VirtioNet

/// Serves one device on one vhost-user socket, on a thread of its own, until stopped.
///
/// Server mode listens and serves one frontend at a time; after a disconnect it resets the device and
/// accepts the next (QEMU reconnects this way). A connection that arrives while a frontend is attached
/// is accepted and closed at once, with a warning. Client mode connects to a socket the VMM listens on
/// and connects again, with back-off, after a disconnect.
///
/// The thread waits on the listener, the current connection and the stop signal together, so a
/// second connection or `stop()` is handled while a frontend is attached. A connection that does not
/// send its first complete message within `handshakeTimeout`, or stalls that long in the middle of a
/// message, is dropped; an established connection that is merely quiet is kept.
public final class VhostUserService: Sendable {
    public enum Mode: String, Sendable {
        case server
        case client
    }

    public let path: String
    public let mode: Mode
    public let device: NetDevice
    public let handshakeTimeout: Duration
    /// The most guest memory one frontend may map (see `VhostUserBackend.memoryLimit`).
    public let memoryLimit: UInt64
    private let logger: Logger
    private let stopSignal: EventFD
    private let state = Mutex<(stopping: Bool, thread: WorkerThread?, connections: Int, refused: Int)>((false, nil, 0, 0))
    /// Set to nil once the thread has ended, which closes it: connections still queued get end-of-file.
    private let listener: Mutex<UnixSocket?>
    /// Descriptors the service holds, as its thread last counted them (see `descriptorCount`).
    private let heldDescriptors: Atomic<Int>
    /// After accept fails (out of descriptors, say), the listener rests this long instead of spinning.
    static let acceptBackoff = Duration.milliseconds(100)

    /// In server mode the socket is bound here, so a path problem is reported before anything runs.
    public init(path: String, mode: Mode, device: NetDevice, logger: Logger, handshakeTimeout: Duration = .seconds(10),
                memoryLimit: UInt64 = VhostUserBackend.defaultMemoryLimit) throws(SystemError) {
        self.path = path
        self.mode = mode
        self.device = device
        self.logger = logger
        self.handshakeTimeout = handshakeTimeout
        self.memoryLimit = memoryLimit
        self.stopSignal = try EventFD()
        heldDescriptors = Atomic(mode == .server ? 2 : 1)
        if mode == .server {
            Self.createParentDirectory(of: path)
            try Self.removeStaleSocket(path)
            let socket = try UnixSocket.listen(path: path)
            try socket.setNonBlocking(true)
            listener = Mutex(socket)
        } else {
            listener = Mutex(nil)
        }
    }

    /// Descriptors the service holds now: its stop eventfd, the listener (server mode), the
    /// frontend's connection and the eventfds the frontend gave for its rings.
    public var descriptorCount: Int {
        heldDescriptors.load(ordering: .relaxed) + attached.withLock { $0?.count ?? 0 }
    }
    /// The eventfd count of the frontend attached now, for `descriptorCount` from other threads.
    private let attached = Mutex<VhostUserBackend.Tally?>(nil)

    /// How many frontends have connected so far.
    public var connectionCount: Int { state.withLock { $0.connections } }

    /// How many connections were closed at once because a frontend was attached.
    public var refusedCount: Int { state.withLock { $0.refused } }

    public func start() throws(SystemError) {
        let thread = try WorkerThread(name: "vhost-\(device.configuration.mac.description.suffix(5))") { [self] in run() }
        state.withLock { $0.thread = thread }
    }

    /// Stops accepting, ends the current connection (resetting the device) and removes the socket.
    public func stop() {
        let thread = state.withLock { state in
            state.stopping = true
            return state.thread
        }
        try? stopSignal.signal()
        thread?.join()
        listener.withLock { $0 = nil }
        if mode == .server { unlink(path) }
    }

    private var stopping: Bool { state.withLock { $0.stopping } }

    private func run() {
        let listener = self.listener.withLock { $0 }
        var connection: VhostUserConnection? = nil
        var listenerRestsUntil: ContinuousClock.Instant? = nil
        var backoff = Duration.milliseconds(100)
        defer {
            if let connection { finish(connection, .stopped) }
            heldDescriptors.store(1, ordering: .relaxed)
        }

        while !stopping {
            if mode == .client && connection == nil {
                do {
                    connection = try adopt(try UnixSocket.connect(path: path))
                    backoff = .milliseconds(100)
                } catch {
                    logger.debug("vhost-user connect failed; retrying", metadata: ["socket": "\(path)", "error": "\(error)"])
                    let deadline = ContinuousClock.now + backoff
                    if let ready = try? waitReady([(stopSignal.rawValue, .readable)], timeoutMilliseconds: pollTimeout(until: deadline)), !ready[0].isEmpty { return }
                    backoff = min(backoff * 2, .seconds(2))
                    continue
                }
            }

            heldDescriptors.store(1 + (listener == nil ? 0 : 1) + (connection == nil ? 0 : 1), ordering: .relaxed)
            let now = ContinuousClock.now
            if let until = listenerRestsUntil, now >= until { listenerRestsUntil = nil }
            var waitFor: [(fd: Int32, events: PollEvents)] = [(stopSignal.rawValue, .readable)]
            var listenerSlot: Int? = nil
            var connectionSlot: Int? = nil
            if let listener, listenerRestsUntil == nil {
                listenerSlot = waitFor.count
                waitFor.append((listener.rawValue, .readable))
            }
            if let connection {
                connectionSlot = waitFor.count
                waitFor.append((connection.socket.rawValue, .readable))
            }
            let ready: [PollEvents]
            do {
                ready = try waitReady(waitFor, timeoutMilliseconds: pollTimeout(until: earliest(connection?.deadline, listenerRestsUntil), now: now))
            } catch {
                // poll fails only on bad arguments or without memory: end rather than spin.
                logger.critical("vhost-user service stopped: poll failed", metadata: ["socket": "\(path)", "error": "\(error)"])
                return
            }
            if !ready[0].isEmpty { return }

            // The connection first: a frontend that left just before the next one connected is
            // finished before the listener is looked at, so the next one is not taken for a second.
            if let current = connection, let slot = connectionSlot, !ready[slot].isEmpty {
                var end = current.readAvailable(stopSignal: stopSignal.rawValue)
                // Hung up: nothing more can arrive, so what is queued is handled to the end now.
                while end == nil && !ready[slot].isDisjoint(with: [.hangUp, .error]) {
                    end = current.readAvailable(stopSignal: stopSignal.rawValue)
                }
                if let end {
                    finish(current, end)
                    connection = nil
                }
            }
            if let listener, let slot = listenerSlot, !ready[slot].isEmpty {
                while true {
                    let socket: UnixSocket
                    do {
                        guard let accepted = try listener.acceptPending() else { break }
                        socket = accepted
                    } catch {
                        logger.error("vhost-user accept failed", metadata: ["socket": "\(path)", "error": "\(error)"])
                        listenerRestsUntil = .now + Self.acceptBackoff
                        break
                    }
                    if connection == nil {
                        // Looked at before any later connection is: it may already have left.
                        connection = try? adopt(socket)
                        if connection != nil { break }
                    } else {
                        refuse(socket)
                    }
                }
            }

            if let current = connection, let end = current.expired() {
                finish(current, end)
                connection = nil
            }
        }
    }

    /// A new frontend: its connection, with the handshake deadline running.
    private func adopt(_ socket: UnixSocket) throws(SystemError) -> VhostUserConnection {
        let backend = VhostUserBackend(device: device, logger: logger, memoryLimit: memoryLimit)
        let connection: VhostUserConnection
        do {
            connection = try VhostUserConnection(socket: socket, backend: backend, logger: logger, handshakeTimeout: handshakeTimeout)
        } catch {
            logger.error("vhost-user connection dropped: cannot make it non-blocking", metadata: ["socket": "\(path)", "error": "\(error)"])
            throw error
        }
        state.withLock { $0.connections += 1 }
        let tally = backend.eventFDTally
        attached.withLock { $0 = tally }
        logger.info("vhost-user frontend connected", metadata: ["socket": "\(path)"])
        return connection
    }

    /// A connection while a frontend is attached: closed at once, so its peer learns it promptly.
    private func refuse(_ socket: UnixSocket) {
        socket.shutdown()
        state.withLock { $0.refused += 1 }
        logger.warning("vhost-user connection refused: a frontend is already attached", metadata: ["socket": "\(path)"])
    }

    private func finish(_ connection: VhostUserConnection, _ end: VhostUserConnection.End) {
        connection.socket.shutdown()
        connection.backend.reset()
        attached.withLock { $0 = nil }
        switch end {
        case .timedOut(let why):
            logger.warning("vhost-user frontend dropped: too slow", metadata: ["socket": "\(path)", "reason": "\(why)"])
        default:
            logger.info("vhost-user frontend disconnected", metadata: ["socket": "\(path)", "reason": "\(end)"])
        }
    }

    /// Creates the socket's directory (like /run/virtio-netd) if it is missing; bind reports the rest.
    static func createParentDirectory(of path: String) {
        guard let slash = path.lastIndex(of: "/"), slash != path.startIndex else { return }
        var prefix = ""
        for component in path[..<slash].split(separator: "/") {
            prefix += "/" + component
            mkdir(prefix, 0o755)
        }
    }

    /// A socket file left by a daemon that died is removed; a live one, or a non-socket, is an error.
    static func removeStaleSocket(_ path: String) throws(SystemError) {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        guard info.st_mode & S_IFMT == S_IFSOCK else { throw SystemError(call: "bind(\(path)): exists and is not a socket", code: EEXIST) }
        if (try? UnixSocket.connect(path: path)) != nil {
            throw SystemError(call: "bind(\(path)): another process is serving it", code: EADDRINUSE)
        }
        unlink(path)
    }
}
