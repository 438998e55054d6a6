#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import Synchronization
import Sys
import Testing
import VirtioNetDaemon

/// A TCP connection to 127.0.0.1:`port` opened inside a namespace, closed by `close()` or at the end.
final class RawClient: @unchecked Sendable {
    private(set) var fd: Int32

    /// `receiveBuffer`: SO_RCVBUF before connecting (a small one keeps the window small, so a
    /// response the client does not read fills the server's side quickly).
    init(namespace: TestNamespace, port: UInt16, receiveBuffer: Int32? = nil) throws {
        fd = try namespace.run {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { throw SystemError(call: "socket", code: errno) }
            if var size = receiveBuffer {
                setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = port.bigEndian
            inet_pton(AF_INET, "127.0.0.1", &address.sin_addr)
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard connected == 0 else {
                let code = errno
                Glibc.close(fd)
                throw SystemError(call: "connect(127.0.0.1:\(port))", code: code)
            }
            return fd
        }
    }

    func send(_ text: String) throws {
        let bytes = Array(text.utf8)
        guard bytes.withUnsafeBytes({ Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }) == bytes.count else {
            throw SystemError(call: "send", code: errno)
        }
    }

    /// Reads (and drops) until the server closes the connection; true if it did within `timeout`.
    func waitForClose(timeout: Double) -> Bool {
        let deadline = monotonicNow() + timeout
        var buffer = [UInt8](repeating: 0, count: 65536)
        while monotonicNow() < deadline {
            var entry = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&entry, 1, 100) > 0 else { continue }
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count == 0 || (count < 0 && errno != EINTR && errno != EAGAIN) { return true }
        }
        return false
    }

    /// Waits, without reading, until the connection is reset or fully closed by the server (POLLHUP
    /// or POLLERR); true if that happened within `timeout`.
    func waitForHangUp(timeout: Double) -> Bool {
        let deadline = monotonicNow() + timeout
        while monotonicNow() < deadline {
            var entry = pollfd(fd: fd, events: 0, revents: 0)
            if poll(&entry, 1, 100) > 0 && entry.revents & Int16(POLLHUP | POLLERR) != 0 { return true }
        }
        return false
    }

    func close() {
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }

    deinit { close() }
}

/// A MetricsServer on 127.0.0.1 inside a namespace of its own, whose body has `bodySize` bytes.
final class ServedMetrics: Sendable {
    let namespace: TestNamespace
    let server: MetricsServer
    private let renderCount = Counter()
    private let stopped = Atomic<Bool>(false)

    private final class Counter: Sendable {
        let value = Atomic<Int>(0)
    }

    /// How many times the body was rendered (once per /metrics request the server read).
    var renders: Int { renderCount.value.load(ordering: .relaxed) }

    init(bodySize: Int, clientTimeout: Duration = .seconds(10)) throws {
        namespace = try TestNamespace()
        let line = "virtio_net_test_metric{device=\"x\"} 1\n"
        let body = String(repeating: line, count: max(1, bodySize / line.utf8.count))
        let renders = renderCount
        do {
            server = try namespace.run {
                try MetricsServer(host: "127.0.0.1", port: 0, logger: quietLogger, clientTimeout: clientTimeout) {
                    renders.value.add(1, ordering: .relaxed)
                    return body
                }
            }
            try server.start()
        } catch {
            namespace.delete()
            throw error
        }
    }

    var port: UInt16 { server.port }

    /// GET `path` from inside the namespace (a 10 s receive timeout); the whole response.
    func get(_ path: String = "/metrics") throws -> String {
        let port = self.port
        return try namespace.run { try httpGet(port: port, path: path) }
    }

    /// Calls stop() on a thread of its own; true if it returned within `timeout` seconds. Either way
    /// the thread is joined before returning (after `unblock` ran, if stop() was late).
    func stopWithin(_ timeout: Double, unblock: () -> Void = {}) throws -> Bool {
        let thread = try WorkerThread(name: "metrics-stop") { [self] in
            server.stop()
            stopped.store(true, ordering: .releasing)
        }
        let prompt = eventually(timeout: timeout) { stopped.load(ordering: .acquiring) }
        if !prompt { unblock() }
        thread.join()
        return prompt
    }

    /// Stops the server (again: stop() may be called more than once) and deletes the namespace.
    func delete() {
        server.stop()
        namespace.delete()
    }
}

private let isRoot = getuid() == 0

@Suite("Metrics endpoint: slow, silent and non-reading clients")
struct MetricsServerTests {
    @Test("Clients that connect and send nothing delay neither another client's /metrics nor stop()",
          .enabled(if: isRoot, "needs root for a network namespace"))
    func silentClients() throws {
        let served = try ServedMetrics(bodySize: 4096)
        defer { served.delete() }
        var silent: [RawClient] = []
        defer { for client in silent { client.close() } }
        for _ in 0..<16 { silent.append(try RawClient(namespace: served.namespace, port: served.port)) }

        let started = monotonicNow()
        let response = Result { try served.get() }
        #expect(throws: Never.self, "answered while 16 silent clients are connected") { try response.get() }
        #expect((try? response.get())?.hasPrefix("HTTP/1.1 200") == true)
        #expect((try? response.get())?.contains("virtio_net_test_metric") == true)
        #expect(monotonicNow() - started < 10, "answered within 10 s")
        if (try? response.get()) != nil { #expect(try served.get("/other").hasPrefix("HTTP/1.1 404")) }

        #expect(try served.stopWithin(10) { for client in silent { client.close() } }, "stop() returns while silent clients are connected")
    }

    @Test("A client that asks for a large response and never reads delays neither another client's /metrics nor stop()",
          .enabled(if: isRoot, "needs root for a network namespace"))
    func nonReadingClient() throws {
        let served = try ServedMetrics(bodySize: 16 << 20)
        defer { served.delete() }
        let stuck = try RawClient(namespace: served.namespace, port: served.port, receiveBuffer: 4096)
        defer { stuck.close() }
        try stuck.send("GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        #expect(eventually { served.renders == 1 }, "the server rendered the stuck client's response")

        // httpGet gives up after 10 s without data.
        let response = Result { try served.get() }
        #expect(throws: Never.self, "another client is answered") { try response.get() }
        let text = (try? response.get()) ?? ""
        #expect(text.hasPrefix("HTTP/1.1 200"), "\(text.prefix(100))")
        #expect(text.utf8.count > 16 << 20, "the whole body arrived: \(text.utf8.count) bytes")

        #expect(try served.stopWithin(10) { stuck.close() }, "stop() returns while a client does not read its response")
    }

    @Test("A client that does not finish its request, or does not read its response, is disconnected after the client timeout",
          .enabled(if: isRoot, "needs root for a network namespace"))
    func slowClientsAreDisconnected() throws {
        let served = try ServedMetrics(bodySize: 16 << 20, clientTimeout: .milliseconds(300))
        defer { served.delete() }
        let silent = try RawClient(namespace: served.namespace, port: served.port)
        let partial = try RawClient(namespace: served.namespace, port: served.port)
        try partial.send("GET /metr")
        let stuck = try RawClient(namespace: served.namespace, port: served.port, receiveBuffer: 4096)
        try stuck.send("GET /metrics HTTP/1.0\r\n\r\n")
        #expect(eventually { served.renders == 1 })
        #expect(silent.waitForClose(timeout: 10), "a silent client is disconnected")
        #expect(partial.waitForClose(timeout: 10), "a client with half a request is disconnected")
        // Without reading a byte: the server gives up on the response and resets the connection.
        #expect(stuck.waitForHangUp(timeout: 10), "a client that does not read is disconnected")
        // Still serving (a small answer: 16 MiB may take longer than this short timeout to render).
        #expect(try served.get("/other").hasPrefix("HTTP/1.1 404"))
        #expect(try served.stopWithin(10))
    }
}
