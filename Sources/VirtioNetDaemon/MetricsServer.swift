#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Logging
import Synchronization
import Sys

/// A minimal HTTP endpoint for Prometheus: GET /metrics answers `render()`; anything else is 404.
/// Loopback only, one request per connection, on a thread of its own.
///
/// The thread never waits on one client: it polls the listener, the stop signal and every client
/// with non-blocking I/O, so a client that sends nothing, or never reads its response, holds only its
/// own connection, and only until its deadline; other clients are answered meanwhile and `stop()`
/// wakes the thread at once.
public final class MetricsServer: Sendable {
    private let listener: Int32
    private let stopSignal: EventFD
    private let render: @Sendable () -> String
    private let logger: Logger
    private let clientTimeout: Duration
    private let maximumClients: Int
    private let state = Mutex<(thread: WorkerThread?, stopped: Bool)>((nil, false))
    public let port: UInt16
    /// Clients served at once unless told otherwise.
    public static let defaultMaximumClients = 32
    /// A request is this long at most (Prometheus sends a few hundred bytes).
    static let maximumRequest = 8192

    /// Binds `host`:`port` (0: any free port, see `port`). A client has `clientTimeout` from its
    /// connection to send its request and read the whole response; at most `maximumClients` are
    /// served at once, and connections beyond them are closed at once.
    public init(host: String, port: UInt16, logger: Logger, clientTimeout: Duration = .seconds(10), maximumClients: Int = MetricsServer.defaultMaximumClients,
                render: @escaping @Sendable () -> String) throws(SystemError) {
        self.render = render
        self.logger = logger
        self.clientTimeout = clientTimeout
        self.maximumClients = max(1, maximumClients)
        stopSignal = try EventFD()
        let ipv6 = host == "::1"
        let fd = try retryingOnInterrupt("socket") { socket(ipv6 ? AF_INET6 : AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var result: Int32
        if ipv6 {
            var address = sockaddr_in6()
            address.sin6_family = sa_family_t(AF_INET6)
            address.sin6_port = port.bigEndian
            address.sin6_addr = in6addr_loopback
            result = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) } }
        } else {
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = port.bigEndian
            inet_pton(AF_INET, host == "localhost" ? "127.0.0.1" : host, &address.sin_addr)
            result = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        }
        if result != 0 || listen(fd, 16) != 0 {
            let code = errno
            close(fd)
            throw SystemError(call: "bind(\(host):\(port))", code: code)
        }
        var bound = sockaddr_in6()
        var length = socklen_t(MemoryLayout<sockaddr_in6>.size)
        _ = withUnsafeMutablePointer(to: &bound) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        self.port = UInt16(bigEndian: bound.sin6_port)  // sin_port and sin6_port share the offset
        // Non-blocking: the thread accepts until EAGAIN and never waits in accept.
        let owned = OwnedFileDescriptor(taking: fd)
        try owned.setNonBlocking(true)
        listener = owned.release()
    }

    public func start() throws(SystemError) {
        let worker = try WorkerThread(name: "metrics-http") { [self] in run() }
        state.withLock { $0.thread = worker }
    }

    /// Stops the thread, closes every client connection and the listener. Waits for no client;
    /// calling it again does nothing.
    public func stop() {
        let (thread, first) = state.withLock { state in
            defer {
                state.stopped = true
                state.thread = nil
            }
            return (state.thread, !state.stopped)
        }
        try? stopSignal.signal()
        thread?.join()
        if first { Glibc.close(listener) }
    }

    /// One client connection: its request so far, then its response and how much of it was sent.
    private final class Client {
        let descriptor: OwnedFileDescriptor
        let deadline: ContinuousClock.Instant
        var request: [UInt8] = []
        var response: [UInt8]?
        var sent = 0
        var done = false

        init(_ descriptor: consuming OwnedFileDescriptor, deadline: ContinuousClock.Instant) {
            self.descriptor = descriptor
            self.deadline = deadline
        }
        var fd: Int32 { descriptor.rawValue }
    }

    private func run() {
        var clients: [Client] = []
        defer { for client in clients where !client.done { drop(client) } }
        while true {
            let now = ContinuousClock.now
            clients.removeAll { client in
                if client.done { return true }
                guard now >= client.deadline else { return false }
                logger.debug("metrics client dropped: too slow", metadata: [
                    "request_bytes": "\(client.request.count)", "response_bytes_sent": "\(client.sent)",
                ])
                drop(client)
                return true
            }
            var waitFor: [(fd: Int32, events: PollEvents)] = [(stopSignal.rawValue, .readable), (listener, .readable)]
            for client in clients { waitFor.append((client.fd, client.response == nil ? .readable : .writable)) }
            let ready: [PollEvents]
            do { ready = try waitReady(waitFor, timeoutMilliseconds: pollTimeout(until: clients.map(\.deadline).min(), now: now)) } catch {
                logger.critical("metrics endpoint stopped: poll failed", metadata: ["error": "\(error)"])
                return
            }
            if !ready[0].isEmpty { return }
            for (index, client) in clients.enumerated() where !ready[index + 2].isEmpty {
                progress(client)
            }
            if !ready[1].isEmpty { accept(into: &clients) }
        }
    }

    /// Accepts every waiting connection; past `maximumClients`, each is closed at once.
    private func accept(into clients: inout [Client]) {
        while true {
            let fd: Int32
            do {
                guard let accepted = try retryingOnInterruptUnlessWouldBlock("accept4", { cvs_accept_cloexec(listener) }) else { return }
                fd = accepted
            } catch {
                // Out of descriptors, say: the connection stays queued until a client ends.
                logger.error("metrics accept failed", metadata: ["error": "\(error)"])
                return
            }
            let descriptor = OwnedFileDescriptor(taking: fd)
            guard clients.count < maximumClients else {
                logger.debug("metrics client refused: too many connections", metadata: ["clients": "\(clients.count)"])
                continue  // closed here
            }
            do { try descriptor.setNonBlocking(true) } catch {
                logger.error("metrics client dropped", metadata: ["error": "\(error)"])
                continue
            }
            let client = Client(descriptor, deadline: .now + clientTimeout)
            clients.append(client)
            // Most clients send their request at once: answer without another wait if so.
            progress(client)
        }
    }

    /// Reads what the client sent; once the request is complete, writes what fits of the response.
    private func progress(_ client: Client) {
        do {
            if client.response == nil {
                var buffer = [UInt8](repeating: 0, count: 2048)
                while client.response == nil {
                    let room = min(buffer.count, Self.maximumRequest - client.request.count)
                    let count = try buffer.withUnsafeMutableBytes { bytes in
                        try retryingOnInterruptUnlessWouldBlock("recv") { recv(client.fd, bytes.baseAddress, room, 0) }
                    }
                    guard let count else { return }
                    if count == 0 {
                        // The client stopped sending: answer what came, if anything did.
                        if client.request.isEmpty { finish(client); return }
                        client.response = response(to: client.request)
                    } else {
                        client.request += buffer[0..<count]
                        if Self.isComplete(client.request) || client.request.count >= Self.maximumRequest {
                            client.response = response(to: client.request)
                        }
                    }
                }
            }
            guard let response = client.response else { return }
            while client.sent < response.count {
                let count = try response.withUnsafeBytes { bytes in
                    try retryingOnInterruptUnlessWouldBlock("send") {
                        send(client.fd, bytes.baseAddress! + client.sent, bytes.count - client.sent, Int32(MSG_NOSIGNAL))
                    }
                }
                guard let count else { return }
                client.sent += count
            }
            finish(client)
        } catch {
            logger.debug("metrics client failed", metadata: ["error": "\(error)"])
            finish(client)
        }
    }

    /// The request's head has ended (a blank line).
    private static func isComplete(_ request: [UInt8]) -> Bool {
        var newlines = 0
        for byte in request {
            switch byte {
            case 10: newlines += 1
                if newlines == 2 { return true }
            case 13: continue
            default: newlines = 0
            }
        }
        return false
    }

    private func response(to request: [UInt8]) -> [UInt8] {
        let line = String(decoding: request.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self)
        let parts = line.split(separator: " ")
        let response: String
        if parts.count >= 2, parts[0] == "GET", parts[1] == "/metrics" || parts[1].hasPrefix("/metrics?") {
            let body = render()
            response = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body
        } else {
            let body = "not found\n"
            response = "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body
        }
        return Array(response.utf8)
    }

    /// A client that was answered (or is gone): FIN after the response; the descriptor closes with
    /// `client`, when the loop lets go of it.
    private func finish(_ client: Client) {
        _ = Glibc.shutdown(client.fd, Int32(SHUT_WR))
        client.done = true
    }

    /// A client given up on: reset (SO_LINGER 0), so the kernel drops what it has not sent yet
    /// rather than keep it for a peer that does not read.
    private func drop(_ client: Client) {
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        setsockopt(client.fd, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
    }
}
