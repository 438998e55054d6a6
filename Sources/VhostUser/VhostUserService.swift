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
/// accepts the next (QEMU reconnects this way). Client mode connects to a socket the VMM listens on and
/// connects again, with back-off, after a disconnect.
public final class VhostUserService: Sendable {
    public enum Mode: String, Sendable {
        case server
        case client
    }

    public let path: String
    public let mode: Mode
    public let device: NetDevice
    /// The most guest memory one frontend may map (see `VhostUserBackend.memoryLimit`).
    public let memoryLimit: UInt64
    private let logger: Logger
    private let stopSignal: EventFD
    private let state = Mutex<(stopping: Bool, connection: UnixSocket?, thread: WorkerThread?, connections: Int)>((false, nil, nil, 0))
    private let listener: UnixSocket?

    /// In server mode the socket is bound here, so a path problem is reported before anything runs.
    public init(path: String, mode: Mode, device: NetDevice, logger: Logger,
                memoryLimit: UInt64 = VhostUserBackend.defaultMemoryLimit) throws(SystemError) {
        self.path = path
        self.mode = mode
        self.device = device
        self.memoryLimit = memoryLimit
        self.logger = logger
        self.stopSignal = try EventFD()
        if mode == .server {
            Self.createParentDirectory(of: path)
            try Self.removeStaleSocket(path)
            listener = try UnixSocket.listen(path: path)
        } else {
            listener = nil
        }
    }

    /// How many frontends have connected so far.
    public var connectionCount: Int { state.withLock { $0.connections } }

    public func start() throws(SystemError) {
        let thread = try WorkerThread(name: "vhost-\(device.configuration.mac.description.suffix(5))") { [self] in run() }
        state.withLock { $0.thread = thread }
    }

    /// Stops accepting, ends the current connection (resetting the device) and removes the socket.
    public func stop() {
        let (connection, thread) = state.withLock { state in
            state.stopping = true
            return (state.connection, state.thread)
        }
        try? stopSignal.signal()
        connection?.shutdown()
        thread?.join()
        if mode == .server { unlink(path) }
    }

    private var stopping: Bool { state.withLock { $0.stopping } }

    private func run() {
        var backoffMilliseconds: Int32 = 100
        while !stopping {
            let socket: UnixSocket
            switch mode {
            case .server:
                guard let listener else { return }
                guard let ready = try? waitReadable([listener.rawValue, stopSignal.rawValue], timeoutMilliseconds: -1), !ready[1] else { return }
                guard ready[0] else { continue }
                do { socket = try listener.accept() } catch {
                    logger.error("vhost-user accept failed", metadata: ["socket": "\(path)", "error": "\(error)"])
                    continue
                }
            case .client:
                do {
                    socket = try UnixSocket.connect(path: path)
                    backoffMilliseconds = 100
                } catch {
                    logger.debug("vhost-user connect failed; retrying", metadata: ["socket": "\(path)", "error": "\(error)"])
                    if let ready = try? waitReadable([stopSignal.rawValue], timeoutMilliseconds: backoffMilliseconds), ready[0] { return }
                    backoffMilliseconds = min(backoffMilliseconds * 2, 2000)
                    continue
                }
            }
            let proceed = state.withLock { state -> Bool in
                guard !state.stopping else { return false }
                state.connection = socket
                state.connections += 1
                return true
            }
            guard proceed else { return }
            logger.info("vhost-user frontend connected", metadata: ["socket": "\(path)"])
            let backend = VhostUserBackend(device: device, logger: logger, memoryLimit: memoryLimit)
            let end = VhostUserConnection.serve(socket, backend: backend, logger: logger)
            state.withLock { $0.connection = nil }
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
