#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Logging
import Synchronization
import Sys

/// A minimal HTTP endpoint for Prometheus: GET /metrics answers `render()`; anything else is 404.
/// Loopback only, one request per connection, on a thread of its own.
public final class MetricsServer: Sendable {
    private let listener: Int32
    private let stopSignal: EventFD
    private let render: @Sendable () -> String
    private let logger: Logger
    private let thread = Mutex<WorkerThread?>(nil)
    public let port: UInt16

    public init(host: String, port: UInt16, logger: Logger, render: @escaping @Sendable () -> String) throws(SystemError) {
        self.render = render
        self.logger = logger
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
        listener = fd
    }

    public func start() throws(SystemError) {
        let worker = try WorkerThread(name: "metrics-http") { [self] in run() }
        thread.withLock { $0 = worker }
    }

    public func stop() {
        try? stopSignal.signal()
        thread.withLock { $0?.join() }
        close(listener)
    }

    private func run() {
        while true {
            guard let ready = try? waitReadable([listener, stopSignal.rawValue], timeoutMilliseconds: -1), !ready[1] else { return }
            guard ready[0] else { continue }
            let client = cvs_accept_cloexec(listener)
            guard client >= 0 else { continue }
            serve(client)
            close(client)
        }
    }

    private func serve(_ client: Int32) {
        // A slow or silent client must not hold the endpoint: 2 s to send its request line.
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var request = [UInt8](repeating: 0, count: 2048)
        var count = 0
        while count < request.count {
            let received = request.withUnsafeMutableBytes { recv(client, $0.baseAddress! + count, $0.count - count, 0) }
            if received <= 0 { break }
            count += received
            if request[..<count].firstIndex(of: 10) != nil { break }
        }
        let line = String(decoding: request[..<count].prefix { $0 != 13 && $0 != 10 }, as: UTF8.self)
        let parts = line.split(separator: " ")
        let response: String
        if parts.count >= 2, parts[0] == "GET", parts[1] == "/metrics" || parts[1].hasPrefix("/metrics?") {
            let body = render()
            response = "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body
        } else {
            let body = "not found\n"
            response = "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n" + body
        }
        var bytes = Array(response.utf8)
        var sent = 0
        while sent < bytes.count {
            let result = bytes.withUnsafeMutableBytes { send(client, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL)) }
            if result <= 0 { break }
            sent += result
        }
    }
}
