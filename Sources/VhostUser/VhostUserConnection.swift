import Logging
import Sys

/// Reads messages from one frontend connection and answers them, until the peer goes away or sends
/// something that ends the connection.
public enum VhostUserConnection {
    /// Why a connection ended.
    public enum End: Equatable, Sendable {
        case peerClosed
        case refused(String)
        case ioError(String)
    }

    /// Serves `socket` with `backend` on the calling thread. The backend is reset before returning.
    public static func serve(_ socket: UnixSocket, backend: VhostUserBackend, logger: Logger) -> End {
        let headerBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: VhostUserHeader.size, alignment: 8)
        let payloadBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(VhostUserHeader.maximumPayload), alignment: 8)
        defer {
            headerBuffer.deallocate()
            payloadBuffer.deallocate()
            backend.reset()
        }
        while true {
            // Descriptors travel with the first bytes of a message, so the header comes by recvmsg.
            let received: (count: Int, fds: [ReceivedFD], truncated: Bool)
            do {
                received = try socket.receive(into: headerBuffer)
                if received.count == 0 { return .peerClosed }
                if received.count < VhostUserHeader.size {
                    let rest = UnsafeMutableRawBufferPointer(rebasing: headerBuffer[received.count...])
                    if try !socket.receiveExactly(into: rest) { return .peerClosed }
                }
            } catch {
                return .ioError("\(error)")
            }
            let header = VhostUserHeader(bytes: Array(headerBuffer))
            guard !received.truncated else { return refuse(header, "descriptors were cut off (MSG_CTRUNC) or too many were sent", logger) }
            guard header.flags & VhostUserHeader.versionMask == VhostUserHeader.version, header.flags & VhostUserHeader.replyFlag == 0 else {
                return refuse(header, "bad flags 0x\(String(header.flags, radix: 16)) (version 1, not a reply, expected)", logger)
            }
            guard header.size <= VhostUserHeader.maximumPayload else {
                return refuse(header, "payload of \(header.size) bytes is larger than any request", logger)
            }
            let payloadBytes = UnsafeMutableRawBufferPointer(rebasing: payloadBuffer[0..<Int(header.size)])
            do {
                if try !socket.receiveExactly(into: payloadBytes) { return .peerClosed }
            } catch {
                return .ioError("\(error)")
            }
            let payload = Array(payloadBytes)

            let request = VhostUserRequest(rawValue: header.request)
            logger.trace("vhost-user request", metadata: ["request": "\(request.map { "\($0)" } ?? "\(header.request)")", "size": "\(header.size)", "fds": "\(received.fds.count)"])
            var replyPayload: [UInt8]? = nil
            var failed = false
            // Decided before handling: a reset request must still be acknowledged as asked.
            let wantsAck = backend.wantsAck(header)
            do {
                replyPayload = try backend.handle(header, payload: payload, fds: received.fds)
            } catch {
                if error.fatal || request?.hasReply == true || !wantsAck {
                    return refuse(header, error.message, logger)
                }
                logger.error("vhost-user request refused", metadata: ["request": "\(request.map { "\($0)" } ?? "\(header.request)")", "error": "\(error.message)"])
                failed = true
            }
            if replyPayload == nil && wantsAck {
                var writer = PayloadWriter()
                writer.u64(failed ? 1 : 0)
                replyPayload = writer.bytes
            }
            if let replyPayload {
                let reply = VhostUserHeader(request: header.request, flags: VhostUserHeader.version | VhostUserHeader.replyFlag,
                                            size: UInt32(replyPayload.count))
                do { try socket.send(reply.bytes + replyPayload) } catch { return .ioError("\(error)") }
            }
        }
    }

    private static func refuse(_ header: VhostUserHeader, _ why: String, _ logger: Logger) -> End {
        let name = VhostUserRequest(rawValue: header.request).map { "\($0)" } ?? "\(header.request)"
        logger.error("vhost-user connection closed: bad message", metadata: ["request": "\(name)", "error": "\(why)"])
        return .refused("\(name): \(why)")
    }
}
