import Logging
import Sys

/// One frontend connection: assembles messages from a non-blocking socket as bytes arrive, answers
/// each complete one, and says when the connection must end.
///
/// Nothing here waits for the peer without a bound: reads take what the socket has, and a message
/// must be complete within the handshake timeout of its first byte (the first message within that
/// time of the connection). Between messages there is no deadline, so a quiet frontend (QEMU in
/// steady state) keeps its connection.
public final class VhostUserConnection {
    /// Why a connection ended.
    public enum End: Equatable, Sendable {
        case peerClosed
        case refused(String)
        case ioError(String)
        /// A message, or the first one, did not arrive in time, or a reply was not read in time.
        case timedOut(String)
        /// The service is stopping.
        case stopped
    }

    public let socket: UnixSocket
    public let backend: VhostUserBackend
    private let logger: Logger
    private let timeout: Duration?
    private let headerBuffer: UnsafeMutableRawBufferPointer
    private let payloadBuffer: UnsafeMutableRawBufferPointer
    /// The message being assembled: header bytes so far, the header once complete, payload bytes so
    /// far, and the descriptors that came with its first bytes.
    private var headerCount = 0
    private var header: VhostUserHeader?
    private var payloadCount = 0
    private var fds: [ReceivedFD] = []
    private var truncated = false
    /// When the message being assembled (or the first message) must be complete; nil between messages.
    public private(set) var deadline: ContinuousClock.Instant?
    /// Messages handled per `readAvailable`, so a flood cannot keep the caller from its other duties.
    static let messagesPerWakeUp = 64

    /// `socket` is made non-blocking. With a `handshakeTimeout`, the first message must be complete
    /// within that time, and every later one within that time of its first byte; nil: no deadline.
    public init(socket: UnixSocket, backend: VhostUserBackend, logger: Logger, handshakeTimeout: Duration?) throws(SystemError) {
        try socket.setNonBlocking(true)
        self.socket = socket
        self.backend = backend
        self.logger = logger
        self.timeout = handshakeTimeout
        headerBuffer = .allocate(byteCount: VhostUserHeader.size, alignment: 8)
        payloadBuffer = .allocate(byteCount: Int(VhostUserHeader.maximumPayload), alignment: 8)
        deadline = handshakeTimeout.map { ContinuousClock.now + $0 }
    }

    deinit {
        headerBuffer.deallocate()
        payloadBuffer.deallocate()
    }

    /// Serves `socket` with `backend` on the calling thread until the connection ends, without
    /// deadlines. The backend is reset before returning.
    public static func serve(_ socket: UnixSocket, backend: VhostUserBackend, logger: Logger) -> End {
        defer { backend.reset() }
        let connection: VhostUserConnection
        do { connection = try VhostUserConnection(socket: socket, backend: backend, logger: logger, handshakeTimeout: nil) } catch {
            return .ioError("\(error)")
        }
        while true {
            do { _ = try waitReady([(socket.rawValue, .readable)], timeoutMilliseconds: -1) } catch { return .ioError("\(error)") }
            if let end = connection.readAvailable(stopSignal: nil) { return end }
        }
    }

    /// The end of a connection whose deadline has passed at `now`; nil if it has not.
    public func expired(now: ContinuousClock.Instant = .now) -> End? {
        guard let deadline, now >= deadline, let timeout else { return nil }
        if header == nil && headerCount == 0 && payloadCount == 0 {
            return .timedOut("no message within \(timeout) of connecting")
        }
        let request = header.map { Self.name($0.request) } ?? "a message"
        return .timedOut("\(request) incomplete \(timeout) after its first byte (\(headerCount) header and \(payloadCount) payload bytes)")
    }

    /// Reads what the socket has and handles every message it completes (up to
    /// `messagesPerWakeUp`). Returns nil while the connection goes on. A reply that does not fit in
    /// the socket waits for room until the deadline, or until `stopSignal` is readable.
    public func readAvailable(stopSignal: Int32?) -> End? {
        for _ in 0..<Self.messagesPerWakeUp {
            do {
                // Descriptors travel with the first bytes of a message, so those come by recvmsg.
                while headerCount < VhostUserHeader.size {
                    if headerCount == 0 {
                        guard let received = try socket.receiveAvailable(into: headerBuffer) else { return nil }
                        if received.count == 0 { return .peerClosed }
                        headerCount = received.count
                        fds = received.fds
                        truncated = received.truncated
                        if deadline == nil, let timeout { deadline = .now + timeout }
                    } else {
                        let rest = UnsafeMutableRawBufferPointer(rebasing: headerBuffer[headerCount...])
                        guard let count = try socket.readAvailable(into: rest) else { return nil }
                        if count == 0 { return .peerClosed }
                        headerCount += count
                    }
                }
                if header == nil {
                    let complete = VhostUserHeader(bytes: Array(headerBuffer))
                    guard !truncated else { return refuse(complete, "descriptors were cut off (MSG_CTRUNC) or too many were sent") }
                    guard complete.flags & VhostUserHeader.versionMask == VhostUserHeader.version, complete.flags & VhostUserHeader.replyFlag == 0 else {
                        return refuse(complete, "bad flags 0x\(String(complete.flags, radix: 16)) (version 1, not a reply, expected)")
                    }
                    guard complete.size <= VhostUserHeader.maximumPayload else {
                        return refuse(complete, "payload of \(complete.size) bytes is larger than any request")
                    }
                    header = complete
                }
                guard let header else { return nil }
                let size = Int(header.size)
                while payloadCount < size {
                    let rest = UnsafeMutableRawBufferPointer(rebasing: payloadBuffer[payloadCount..<size])
                    guard let count = try socket.readAvailable(into: rest) else { return nil }
                    if count == 0 { return .peerClosed }
                    payloadCount += count
                }
            } catch {
                return .ioError("\(error)")
            }
            guard let header else { return nil }
            let payload = Array(UnsafeMutableRawBufferPointer(rebasing: payloadBuffer[0..<Int(header.size)]))
            let messageFDs = fds
            self.header = nil
            headerCount = 0
            payloadCount = 0
            fds = []
            truncated = false
            deadline = nil
            if let end = handle(header, payload: payload, fds: messageFDs, stopSignal: stopSignal) { return end }
        }
        return nil
    }

    /// Handles one complete message and sends its reply, if it has one.
    private func handle(_ header: VhostUserHeader, payload: [UInt8], fds: [ReceivedFD], stopSignal: Int32?) -> End? {
        let request = VhostUserRequest(rawValue: header.request)
        logger.trace("vhost-user request", metadata: ["request": "\(Self.name(header.request))", "size": "\(header.size)", "fds": "\(fds.count)"])
        var replyPayload: [UInt8]? = nil
        var failed = false
        // Decided before handling: a reset request must still be acknowledged as asked.
        let wantsAck = backend.wantsAck(header)
        do {
            replyPayload = try backend.handle(header, payload: payload, fds: fds)
        } catch {
            if error.fatal || request?.hasReply == true || !wantsAck {
                return refuse(header, error.message)
            }
            logger.error("vhost-user request refused", metadata: ["request": "\(Self.name(header.request))", "error": "\(error.message)"])
            failed = true
        }
        if replyPayload == nil && wantsAck {
            var writer = PayloadWriter()
            writer.u64(failed ? 1 : 0)
            replyPayload = writer.bytes
        }
        guard let replyPayload else { return nil }
        let reply = VhostUserHeader(request: header.request, flags: VhostUserHeader.version | VhostUserHeader.replyFlag,
                                    size: UInt32(replyPayload.count))
        return send(reply.bytes + replyPayload, stopSignal: stopSignal)
    }

    /// Sends all of `bytes`, waiting for room in the socket until the handshake timeout passes or
    /// `stopSignal` is readable: a frontend that does not read its replies cannot hold the caller.
    private func send(_ bytes: [UInt8], stopSignal: Int32?) -> End? {
        let sendDeadline = timeout.map { ContinuousClock.now + $0 }
        var offset = 0
        while offset < bytes.count {
            do {
                let sent = try bytes.withUnsafeBytes { buffer in
                    try socket.sendAvailable(UnsafeRawBufferPointer(rebasing: buffer[offset...]))
                }
                if let sent {
                    offset += sent
                    continue
                }
                var waitFor: [(fd: Int32, events: PollEvents)] = [(socket.rawValue, .writable)]
                if let stopSignal { waitFor.append((stopSignal, .readable)) }
                let ready = try waitReady(waitFor, timeoutMilliseconds: pollTimeout(until: sendDeadline))
                if ready.count > 1 && !ready[1].isEmpty { return .stopped }
                if let sendDeadline, ContinuousClock.now >= sendDeadline, let timeout {
                    return .timedOut("a reply was not read within \(timeout)")
                }
            } catch {
                return .ioError("\(error)")
            }
        }
        return nil
    }

    private func refuse(_ header: VhostUserHeader, _ why: String) -> End {
        let name = Self.name(header.request)
        logger.error("vhost-user connection closed: bad message", metadata: ["request": "\(name)", "error": "\(why)"])
        return .refused("\(name): \(why)")
    }

    private static func name(_ request: UInt32) -> String {
        VhostUserRequest(rawValue: request).map { "\($0)" } ?? "\(request)"
    }
}
