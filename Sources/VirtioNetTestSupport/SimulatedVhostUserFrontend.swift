#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Sys
import VirtioNet
import Virtqueue

/// Plays a vhost-user frontend (QEMU's side of the socket) against a backend, for tests.
///
/// Self-contained on purpose: messages are encoded here with explicit little-endian bytes and sent
/// with its own `sendmsg`, never with the VhostUser module's types, so tests built on it do not share
/// the code under test. It sends any message with any flags, payload and descriptors (malformed ones
/// too, on purpose), reads replies with deadlines, and `negotiate(...)` brings a device up the way
/// QEMU does. The guest's side of the rings is a `SimulatedVhostUserGuest`.
public final class SimulatedVhostUserFrontend: @unchecked Sendable {
    /// Request numbers (QEMU docs/interop/vhost-user.rst, "Front-end message types").
    public enum Request: UInt32, Sendable {
        case getFeatures = 1, setFeatures = 2, setOwner = 3, resetOwner = 4, setMemTable = 5, setLogBase = 6
        case setLogFD = 7, setVringNum = 8, setVringAddr = 9, setVringBase = 10, getVringBase = 11
        case setVringKick = 12, setVringCall = 13, setVringErr = 14, getProtocolFeatures = 15
        case setProtocolFeatures = 16, getQueueNum = 17, setVringEnable = 18, sendRARP = 19, netSetMTU = 20
        case setBackendReqFD = 21, iotlbMessage = 22, setVringEndian = 23, getConfig = 24, setConfig = 25
        case resetDevice = 34, vringKick = 35, getMaxMemSlots = 36, addMemReg = 37, remMemReg = 38
        case setStatus = 39, getStatus = 40

        /// Requests the backend always answers (not only with REPLY_ACK).
        public var hasReply: Bool {
            switch self {
            // SET_LOG_BASE is answered when the log is shared memory (LOG_SHMFD).
            case .getFeatures, .getProtocolFeatures, .getVringBase, .getQueueNum, .getConfig, .getMaxMemSlots, .getStatus, .setLogBase: true
            default: false
            }
        }
    }

    /// Header flags.
    public static let version: UInt32 = 0x1
    public static let replyFlag: UInt32 = 0x4
    public static let needReplyFlag: UInt32 = 0x8
    /// VHOST_USER_F_PROTOCOL_FEATURES in GET/SET_FEATURES.
    public static let protocolFeaturesBit: UInt64 = 1 << 30

    /// Protocol feature bits.
    public enum ProtocolFeature {
        public static let mq: UInt64 = 1 << 0
        public static let logShmfd: UInt64 = 1 << 1
        public static let rarp: UInt64 = 1 << 2
        public static let replyAck: UInt64 = 1 << 3
        public static let netMTU: UInt64 = 1 << 4
        public static let backendReq: UInt64 = 1 << 5
        public static let config: UInt64 = 1 << 9
        public static let resetDevice: UInt64 = 1 << 13
        public static let inbandNotifications: UInt64 = 1 << 14
        public static let configureMemSlots: UInt64 = 1 << 15
        public static let status: UInt64 = 1 << 16
    }

    /// One reply from the backend.
    public struct Reply: Equatable, Sendable {
        public var request: UInt32
        public var flags: UInt32
        public var payload: [UInt8]
        /// The payload as one u64 (GET_FEATURES, REPLY_ACK, ...), nil if it is not 8 bytes.
        public var u64: UInt64? { payload.count == 8 ? LittleEndian.u64(payload, at: 0) : nil }
    }

    /// What came back for a message.
    public enum Outcome: Equatable, Sendable {
        case reply(Reply)
        /// The backend closed the connection.
        case closed
        /// Nothing came before the deadline.
        case timedOut
        /// No answer was expected, and a round trip after the message shows the connection is up.
        case noAnswer
    }

    public struct FrontendError: Error, CustomStringConvertible, Sendable {
        public let description: String
        public init(_ description: String) { self.description = description }
    }

    /// One memory region as SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG carry it.
    public struct Region: Sendable, Equatable {
        public var guestAddress: UInt64
        public var size: UInt64
        public var userAddress: UInt64
        public var mmapOffset: UInt64
        public init(guestAddress: UInt64, size: UInt64, userAddress: UInt64, mmapOffset: UInt64 = 0) {
            self.guestAddress = guestAddress
            self.size = size
            self.userAddress = userAddress
            self.mmapOffset = mmapOffset
        }

        public var bytes: [UInt8] { LittleEndian.u64(guestAddress) + LittleEndian.u64(size) + LittleEndian.u64(userAddress) + LittleEndian.u64(mmapOffset) }
    }

    public let socket: UnixSocket
    /// Seconds to wait for a reply.
    public var timeout: Double = 10
    /// Set once REPLY_ACK is negotiated: every request without a reply of its own is then sent with
    /// need_reply, and a non-zero ack is an error.
    public private(set) var replyAck = false
    /// What SET_FEATURES acknowledged last.
    public private(set) var acknowledgedFeatures: UInt64 = 0
    public private(set) var protocolFeatures: UInt64 = 0
    private var closed = false

    /// Wraps one end of a connected socket (`UnixSocket.pair()` or an accepted connection).
    public init(socket: UnixSocket) {
        self.socket = socket
    }

    /// Connects to a backend listening at `path`, retrying until `timeout` seconds pass (the socket
    /// may not exist yet when a daemon is starting).
    public static func connect(path: String, timeout: Double = 10) throws -> SimulatedVhostUserFrontend {
        let deadline = now() + timeout
        while true {
            do {
                return SimulatedVhostUserFrontend(socket: try UnixSocket.connect(path: path))
            } catch {
                if now() > deadline { throw FrontendError("cannot connect to \(path) within \(timeout) s: \(error)") }
                _ = poll(nil, 0, 10)
            }
        }
    }

    /// Ends the connection: the backend sees end-of-file.
    public func close() {
        guard !closed else { return }
        closed = true
        socket.shutdown()
    }

    deinit { close() }

    // MARK: Raw messages

    /// The 12-byte header: request, flags, size, little-endian.
    public static func header(request: UInt32, flags: UInt32, size: UInt32) -> [UInt8] {
        LittleEndian.u32(request) + LittleEndian.u32(flags) + LittleEndian.u32(size)
    }

    /// Sends `bytes` as they are, with `fds` attached (SCM_RIGHTS, any count the kernel takes).
    public func sendRaw(_ bytes: [UInt8], fds: [Int32] = []) throws {
        var offset = 0
        var attached = fds
        repeat {
            offset += try Self.sendmsg(socket.rawValue, Array(bytes[offset...]), fds: attached)
            attached = []
        } while offset < bytes.count
    }

    /// Sends one message. `size` overrides the header's size field (to lie about it on purpose).
    public func send(_ request: UInt32, flags: UInt32 = SimulatedVhostUserFrontend.version, payload: [UInt8] = [],
                     fds: [Int32] = [], size: UInt32? = nil) throws {
        try sendRaw(Self.header(request: request, flags: flags, size: size ?? UInt32(payload.count)) + payload, fds: fds)
    }

    /// Reads one reply (header and payload) within `timeout` seconds. A reply announcing more than
    /// 4096 bytes is treated as the end of the connection (nothing legitimate is that large).
    public func readReply(timeout: Double? = nil) -> Outcome {
        let deadline = Self.now() + (timeout ?? self.timeout)
        guard let header = readExactly(12, deadline: deadline) else { return lastReadOutcome }
        let size = Int(LittleEndian.u32(header, at: 8))
        guard size <= 4096 else { return .closed }
        guard let payload = readExactly(size, deadline: deadline) else { return lastReadOutcome }
        return .reply(Reply(request: LittleEndian.u32(header, at: 0), flags: LittleEndian.u32(header, at: 4), payload: payload))
    }

    /// Sends a message and, when the backend must answer it (a request with a reply, or need_reply
    /// with REPLY_ACK negotiated), waits for the answer. Without an expected answer, the result is
    /// `.noAnswer` after a GET_FEATURES round trip showed the connection survived, else `.closed`.
    public func exchange(_ request: UInt32, flags: UInt32 = SimulatedVhostUserFrontend.version, payload: [UInt8] = [],
                         fds: [Int32] = [], size: UInt32? = nil, expectAnswer: Bool? = nil) -> Outcome {
        do { try send(request, flags: flags, payload: payload, fds: fds, size: size) } catch { return .closed }
        let answered = expectAnswer ?? (Request(rawValue: request)?.hasReply == true || (flags & Self.needReplyFlag != 0 && replyAck))
        guard answered else { return sync() ? .noAnswer : .closed }
        return readReply()
    }

    /// A round trip (GET_FEATURES): true when the backend answered, so everything sent before it has
    /// been handled. False when the connection is gone (or no answer came in time). Replies to
    /// earlier messages that arrive first are skipped.
    @discardableResult
    public func sync() -> Bool {
        do { try send(Request.getFeatures.rawValue) } catch { return false }
        let deadline = Self.now() + timeout
        while case .reply(let reply) = readReply(timeout: max(0, deadline - Self.now())) {
            if reply.request == Request.getFeatures.rawValue { return true }
        }
        return false
    }

    /// Waits until the backend closes the connection (reading and dropping anything it still sends).
    public func waitForClose(timeout: Double? = nil) -> Bool {
        let deadline = Self.now() + (timeout ?? self.timeout)
        while true {
            switch readReply(timeout: max(0, deadline - Self.now())) {
            case .closed: return true
            case .timedOut, .noAnswer: return false
            case .reply: continue
            }
        }
    }

    // MARK: Typed requests

    /// Sends `request` and returns its reply payload (requests with a reply) or nil. With REPLY_ACK
    /// negotiated, a request without a reply goes with need_reply and a non-zero ack throws.
    @discardableResult
    public func call(_ request: Request, payload: [UInt8] = [], fds: [Int32] = []) throws -> [UInt8]? {
        let ack = !request.hasReply && replyAck
        let flags = Self.version | (ack ? Self.needReplyFlag : 0)
        try send(request.rawValue, flags: flags, payload: payload, fds: fds)
        guard request.hasReply || ack else { return nil }
        switch readReply() {
        case .closed: throw FrontendError("\(request): the backend closed the connection")
        case .timedOut, .noAnswer: throw FrontendError("\(request): no reply within \(timeout) s")
        case .reply(let reply):
            guard reply.request == request.rawValue else { throw FrontendError("\(request): reply for request \(reply.request)") }
            guard reply.flags == Self.version | Self.replyFlag else { throw FrontendError("\(request): reply flags 0x\(String(reply.flags, radix: 16))") }
            if ack {
                guard reply.u64 == 0 else { throw FrontendError("\(request): refused (ack \(reply.u64.map { "\($0)" } ?? "of \(reply.payload.count) bytes"))") }
                return nil
            }
            return reply.payload
        }
    }

    private func call64(_ request: Request) throws -> UInt64 {
        let payload = try call(request) ?? []
        guard payload.count == 8 else { throw FrontendError("\(request): reply of \(payload.count) bytes, 8 expected") }
        return LittleEndian.u64(payload, at: 0)
    }

    public func getFeatures() throws -> UInt64 { try call64(.getFeatures) }

    public func setFeatures(_ features: UInt64) throws {
        try call(.setFeatures, payload: LittleEndian.u64(features))
        acknowledgedFeatures = features
    }

    public func getProtocolFeatures() throws -> UInt64 { try call64(.getProtocolFeatures) }

    /// Also turns on REPLY_ACK handling here when `features` has it.
    public func setProtocolFeatures(_ features: UInt64) throws {
        try call(.setProtocolFeatures, payload: LittleEndian.u64(features))
        protocolFeatures = features
        replyAck = features & ProtocolFeature.replyAck != 0
    }

    /// Changes what this frontend believes was negotiated, without a message (to model a frontend
    /// that renegotiates after a reset, or one that assumes features survive it).
    public func assumeProtocolFeatures(_ features: UInt64) {
        protocolFeatures = features
        replyAck = features & ProtocolFeature.replyAck != 0
    }

    public func setOwner() throws { try call(.setOwner) }
    public func getQueueNum() throws -> UInt64 { try call64(.getQueueNum) }
    public func getMaxMemSlots() throws -> UInt64 { try call64(.getMaxMemSlots) }
    public func getStatus() throws -> UInt64 { try call64(.getStatus) }
    public func setStatus(_ status: UInt8) throws { try call(.setStatus, payload: LittleEndian.u64(UInt64(status))) }
    public func netSetMTU(_ mtu: UInt64) throws { try call(.netSetMTU, payload: LittleEndian.u64(mtu)) }

    public func setMemTable(_ regions: [Region], fds: [Int32]) throws {
        try call(.setMemTable, payload: Self.memTablePayload(regions), fds: fds)
    }

    public func addMemoryRegion(_ region: Region, fd: Int32) throws {
        try call(.addMemReg, payload: LittleEndian.u64(0) + region.bytes, fds: [fd])
    }

    public func removeMemoryRegion(_ region: Region) throws {
        try call(.remMemReg, payload: LittleEndian.u64(0) + region.bytes)
    }

    public func setVringNum(_ index: UInt32, _ num: UInt32) throws { try call(.setVringNum, payload: Self.vringState(index, num)) }
    public func setVringBase(_ index: UInt32, _ base: UInt32) throws { try call(.setVringBase, payload: Self.vringState(index, base)) }
    public func setVringEnable(_ index: UInt32, _ enable: Bool) throws { try call(.setVringEnable, payload: Self.vringState(index, enable ? 1 : 0)) }

    public func setVringAddr(_ index: UInt32, descriptorTable: UInt64, usedRing: UInt64, availableRing: UInt64, flags: UInt32 = 0, log: UInt64 = 0) throws {
        try call(.setVringAddr, payload: Self.vringAddress(index, flags: flags, descriptorTable: descriptorTable, usedRing: usedRing, availableRing: availableRing, log: log))
    }

    /// SET_VRING_KICK; nil sends the "no descriptor" bit (0x100) instead.
    public func setVringKick(_ index: UInt32, fd: Int32?) throws {
        try call(.setVringKick, payload: LittleEndian.u64(UInt64(index) | (fd == nil ? 0x100 : 0)), fds: fd.map { [$0] } ?? [])
    }

    public func setVringCall(_ index: UInt32, fd: Int32?) throws {
        try call(.setVringCall, payload: LittleEndian.u64(UInt64(index) | (fd == nil ? 0x100 : 0)), fds: fd.map { [$0] } ?? [])
    }

    /// GET_VRING_BASE: stops the ring; returns (index, next available index).
    public func getVringBase(_ index: UInt32) throws -> (index: UInt32, base: UInt32) {
        let payload = try call(.getVringBase, payload: Self.vringState(index, 0)) ?? []
        guard payload.count == 8 else { throw FrontendError("GET_VRING_BASE: reply of \(payload.count) bytes") }
        return (LittleEndian.u32(payload, at: 0), LittleEndian.u32(payload, at: 4))
    }

    /// GET_CONFIG: `size` bytes of the device config space from `offset`.
    public func getConfig(offset: UInt32 = 0, size: UInt32 = 12, flags: UInt32 = 0) throws -> [UInt8] {
        let payload = try call(.getConfig, payload: Self.configPayload(offset: offset, size: size, flags: flags)) ?? []
        guard payload.count == 12 + Int(size), LittleEndian.u32(payload, at: 0) == offset, LittleEndian.u32(payload, at: 4) == size else {
            throw FrontendError("GET_CONFIG: reply of \(payload.count) bytes does not match the request")
        }
        return Array(payload[12...])
    }

    // MARK: Payload encoders (public so tests can build malformed variants)

    public static func vringState(_ index: UInt32, _ num: UInt32) -> [UInt8] { LittleEndian.u32(index) + LittleEndian.u32(num) }

    public static func vringAddress(_ index: UInt32, flags: UInt32 = 0, descriptorTable: UInt64, usedRing: UInt64, availableRing: UInt64, log: UInt64 = 0) -> [UInt8] {
        LittleEndian.u32(index) + LittleEndian.u32(flags) + LittleEndian.u64(descriptorTable) + LittleEndian.u64(usedRing) + LittleEndian.u64(availableRing) + LittleEndian.u64(log)
    }

    /// num regions, padding, then the regions (as many as given, whatever `count` claims).
    public static func memTablePayload(_ regions: [Region], count: UInt32? = nil) -> [UInt8] {
        LittleEndian.u32(count ?? UInt32(regions.count)) + LittleEndian.u32(0) + regions.flatMap(\.bytes)
    }

    public static func configPayload(offset: UInt32, size: UInt32, flags: UInt32) -> [UInt8] {
        LittleEndian.u32(offset) + LittleEndian.u32(size) + LittleEndian.u32(flags) + [UInt8](repeating: 0, count: Int(size))
    }

    /// The regions of simulated guest memory, as a frontend describes them.
    public static func regions(of memory: SimulatedGuestMemory) -> [Region] {
        memory.memory.regions.map {
            Region(guestAddress: $0.description.guestAddress.rawValue, size: $0.description.size,
                   userAddress: $0.description.userAddress, mmapOffset: $0.description.mmapOffset)
        }
    }

    // MARK: Negotiation

    static let ringPackedBit: UInt64 = 1 << 34

    /// The protocol features `negotiate` asks for by default (those QEMU's vhost-user-net uses).
    public static let defaultProtocolFeatures: UInt64 = ProtocolFeature.mq | ProtocolFeature.replyAck | ProtocolFeature.netMTU
        | ProtocolFeature.configureMemSlots | ProtocolFeature.status | ProtocolFeature.rarp | ProtocolFeature.logShmfd

    /// Brings the device up in QEMU's order: GET_FEATURES, SET_FEATURES (offered ∩ `wanted`, plus bit
    /// 30 when `protocolFeatures` is not nil and offered), GET/SET_PROTOCOL_FEATURES (supported ∩
    /// `protocolFeatures`), SET_OWNER, GET_QUEUE_NUM, SET_MEM_TABLE with the memory's memfds, then
    /// per ring SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR (frontend-virtual), SET_VRING_KICK,
    /// SET_VRING_CALL, then SET_VRING_ENABLE 1 (with protocol features, unless `enable` is false).
    /// `rings` are the ring indices to set up (all 2 * `queuePairs` by default). RING_PACKED only with
    /// `packed` (then each ring starts at QEMU's fresh packed base, 0x8000_8000).
    public func negotiate(memory: SimulatedGuestMemory, queuePairs: Int = 1, queueSize: Int = 256, wanted: UInt64 = ~0, packed: Bool = false,
                          protocolFeatures wantedProtocol: UInt64? = SimulatedVhostUserFrontend.defaultProtocolFeatures,
                          rings: [Int]? = nil, enable: Bool = true) throws -> SimulatedVhostUserGuest {
        let offered = try getFeatures()
        // VHOST_F_LOG_ALL (bit 26) is set only while migrating, as QEMU does.
        var features = offered & wanted & ~Self.protocolFeaturesBit & ~(1 << 26) & ~Self.ringPackedBit
        if packed {
            guard offered & Self.ringPackedBit != 0 else { throw FrontendError("RING_PACKED not offered") }
            features |= Self.ringPackedBit
        }
        let useProtocol = wantedProtocol != nil && offered & Self.protocolFeaturesBit != 0
        if useProtocol { features |= Self.protocolFeaturesBit }
        try setFeatures(features)
        if useProtocol, let wantedProtocol {
            let supported = try getProtocolFeatures()
            try setProtocolFeatures(supported & wantedProtocol)
        }
        try setOwner()
        if protocolFeatures & ProtocolFeature.mq != 0 {
            let queues = try getQueueNum()
            guard queues >= UInt64(queuePairs) else { throw FrontendError("GET_QUEUE_NUM: \(queues) < \(queuePairs)") }
        }
        try setMemTable(Self.regions(of: memory), fds: memory.fds)
        let guest = try SimulatedVhostUserGuest(memory: memory, queuePairs: queuePairs, queueSize: queueSize, features: features)
        for index in rings ?? Array(0..<(2 * queuePairs)) {
            try startRing(index, of: guest, base: packed ? 0x8000_8000 : 0)
        }
        if useProtocol && enable {
            for index in rings ?? Array(0..<(2 * queuePairs)) { try setVringEnable(UInt32(index), true) }
        }
        return guest
    }

    /// SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK and SET_VRING_CALL for one ring,
    /// with fresh kick and call eventfds (kept in `guest`).
    public func startRing(_ index: Int, of guest: SimulatedVhostUserGuest, base: UInt32) throws {
        let queue = guest.queues[index]
        let ring = UInt32(index)
        try setVringNum(ring, UInt32(queue.size))
        try setVringBase(ring, base)
        guard case let .frontendVirtual(table, available, used) = queue.frontendRings else { throw FrontendError("no frontend addresses") }
        try setVringAddr(ring, descriptorTable: table, usedRing: used, availableRing: available)
        try sendKick(index, of: guest)
        try setVringCall(ring, fd: guest.calls[index].rawValue)
    }

    /// A new kick eventfd for ring `index`, sent with SET_VRING_KICK.
    public func sendKick(_ index: Int, of guest: SimulatedVhostUserGuest) throws {
        let kick = try EventFD()
        guest.replaceKick(index, with: kick)
        try setVringKick(UInt32(index), fd: kick.rawValue)
    }

    // MARK: I/O

    private var lastReadOutcome: Outcome = .timedOut

    private func readExactly(_ count: Int, deadline: Double) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var offset = 0
        while offset < count {
            let remaining = deadline - Self.now()
            guard remaining > 0 else { lastReadOutcome = .timedOut; return nil }
            var entry = pollfd(fd: socket.rawValue, events: Int16(POLLIN), revents: 0)
            let ready = poll(&entry, 1, Int32(min(remaining * 1000 + 1, 1000)))
            if ready <= 0 { continue }
            let result = bytes.withUnsafeMutableBytes { Glibc.read(socket.rawValue, $0.baseAddress! + offset, count - offset) }
            if result < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            if result <= 0 { lastReadOutcome = .closed; return nil }
            offset += result
        }
        return bytes
    }

    /// sendmsg with SCM_RIGHTS built by hand (cmsghdr: size_t len, int level, int type, then fds),
    /// so any number of descriptors can be sent (the kernel allows up to 253).
    static func sendmsg(_ fd: Int32, _ bytes: [UInt8], fds: [Int32]) throws -> Int {
        let headerSize = MemoryLayout<cmsghdr>.size
        let dataLength = 4 * fds.count
        let space = headerSize + (dataLength + 7) / 8 * 8
        var control = [UInt8](repeating: 0, count: fds.isEmpty ? 0 : space)
        if !fds.isEmpty {
            let length = headerSize + dataLength
            control.withUnsafeMutableBytes { raw in
                raw.storeBytes(of: length, toByteOffset: 0, as: Int.self)
                raw.storeBytes(of: SOL_SOCKET, toByteOffset: MemoryLayout<Int>.size, as: Int32.self)
                raw.storeBytes(of: Int32(SCM_RIGHTS), toByteOffset: MemoryLayout<Int>.size + 4, as: Int32.self)
                for (index, descriptor) in fds.enumerated() {
                    raw.storeBytes(of: descriptor, toByteOffset: headerSize + 4 * index, as: Int32.self)
                }
            }
        }
        var data = bytes
        let result: Int = data.withUnsafeMutableBytes { dataBuffer in
            control.withUnsafeMutableBytes { controlBuffer in
                var vector = iovec(iov_base: dataBuffer.baseAddress, iov_len: dataBuffer.count)
                return withUnsafeMutablePointer(to: &vector) { vectorPointer in
                    var message = msghdr()
                    message.msg_iov = vectorPointer
                    message.msg_iovlen = 1
                    if !fds.isEmpty {
                        message.msg_control = controlBuffer.baseAddress
                        message.msg_controllen = controlBuffer.count
                    }
                    while true {
                        let sent = Glibc.sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
                        if sent < 0 && errno == EINTR { continue }
                        return sent
                    }
                }
            }
        }
        guard result >= 0 else { throw FrontendError("sendmsg: errno \(errno)") }
        return result
    }

    static func now() -> Double {
        var time = timespec()
        clock_gettime(CLOCK_MONOTONIC, &time)
        return Double(time.tv_sec) + Double(time.tv_nsec) / 1e9
    }
}

/// The guest driver's side of the rings behind a vhost-user frontend: split or packed rings in simulated guest
/// memory (SimulatedQueue), kick eventfds it signals when it adds buffers, and call eventfds it waits on.
public final class SimulatedVhostUserGuest: @unchecked Sendable {
    public let memory: SimulatedGuestMemory
    public let queuePairs: Int
    /// The features acknowledged with SET_FEATURES (bit 30 included when negotiated).
    public let features: UInt64
    /// By ring index: 2k receive, 2k+1 transmit.
    public let queues: [SimulatedQueue]
    public private(set) var kicks: [EventFD?]
    public let calls: [EventFD]

    /// The header in front of every frame: 12 bytes, 10 for a legacy driver (no VERSION_1) without
    /// mergeable buffers.
    public var headerSize: Int { features & Self.version1 != 0 || features & Self.mergeableRxBuffers != 0 ? 12 : 10 }
    static let version1: UInt64 = 1 << 32
    static let mergeableRxBuffers: UInt64 = 1 << 15
    static let eventIndexFeature: UInt64 = 1 << 29

    public init(memory: SimulatedGuestMemory, queuePairs: Int, queueSize: Int, features: UInt64) throws {
        self.memory = memory
        self.queuePairs = queuePairs
        self.features = features
        let eventIndex = features & Self.eventIndexFeature != 0
        let layout: SimulatedQueue.Layout = features & SimulatedVhostUserFrontend.ringPackedBit != 0 ? .packed : .split
        queues = (0..<(2 * queuePairs)).map { _ in SimulatedQueue(guest: memory, size: queueSize, eventIndex: eventIndex, layout: layout) }
        memory.sealRingArea()
        kicks = Array(repeating: nil, count: 2 * queuePairs)
        var calls: [EventFD] = []
        for _ in 0..<(2 * queuePairs) { calls.append(try EventFD()) }
        self.calls = calls
    }

    func replaceKick(_ index: Int, with kick: EventFD) { kicks[index] = kick }

    public func receiveQueue(_ pair: Int) -> SimulatedQueue { queues[2 * pair] }
    public func transmitQueue(_ pair: Int) -> SimulatedQueue { queues[2 * pair + 1] }

    /// Signals ring `index`'s kick eventfd if the ring's notification state asks for it (or always).
    public func kick(_ index: Int, since old: UInt16, always: Bool = false) {
        if always || queues[index].needsKick(since: old) { try? kicks[index]?.signal() }
    }

    /// Puts `frame` (after a zeroed virtio-net header of `headerSize`, or `header`) in pair `pair`'s
    /// TX ring and kicks. False when the ring is full.
    @discardableResult
    public func transmit(_ frame: [UInt8], pair: Int = 0, header: [UInt8]? = nil) -> Bool {
        let bytes = (header ?? [UInt8](repeating: 0, count: headerSize)) + frame
        let address = memory.allocate(bytes.count)
        memory.write(bytes, at: address)
        return transmit(at: address, length: UInt32(bytes.count), pair: pair)
    }

    /// Makes a buffer already in guest memory (header included) available on pair `pair`'s TX ring.
    @discardableResult
    public func transmit(at address: GuestAddress, length: UInt32, pair: Int = 0) -> Bool {
        let queue = transmitQueue(pair)
        let old = queue.availableIndex
        guard queue.add([(address, length, false)]) != nil else { return false }
        kick(2 * pair + 1, since: old)
        return true
    }

    /// Used TX entries since the last call.
    public func completedTransmits(pair: Int = 0) -> [(head: UInt16, length: UInt32)] { transmitQueue(pair).takeUsed() }

    /// Posts `count` writable buffers of `size` bytes on pair `pair`'s RX ring and kicks.
    public func postReceiveBuffers(pair: Int = 0, count: Int, size: Int = 2048) {
        let queue = receiveQueue(pair)
        let old = queue.availableIndex
        for _ in 0..<count {
            let address = memory.allocate(size)
            guard queue.add([(address, UInt32(size), true)], publish: false) != nil else { break }
        }
        queue.publishAvailable()
        kick(2 * pair, since: old)
    }

    /// Frames delivered on pair `pair` since the last call, headers removed (mergeable buffers joined).
    public func receivedFrames(pair: Int = 0) -> [[UInt8]] {
        let queue = receiveQueue(pair)
        var pieces: [[UInt8]] = []
        for used in queue.takeUsed() {
            var data: [UInt8] = []
            var remaining = Int(used.length)
            for (address, length) in queue.buffers[used.head] ?? [] where remaining > 0 {
                let take = min(Int(length), remaining)
                data += memory.read(address, count: take)
                remaining -= take
            }
            pieces.append(data)
        }
        var frames: [[UInt8]] = []
        var index = 0
        let mergeable = features & Self.mergeableRxBuffers != 0
        while index < pieces.count {
            guard pieces[index].count >= headerSize else { index += 1; continue }
            let numBuffers = headerSize == 12 ? Int(pieces[index][10]) | Int(pieces[index][11]) << 8 : 1
            let count = mergeable ? max(1, numBuffers) : 1
            var frame = Array(pieces[index][headerSize...])
            for next in pieces[(index + 1)..<min(index + count, pieces.count)] { frame += next }
            frames.append(frame)
            index += count
        }
        return frames
    }

    /// Waits (on the call eventfds, re-checking at least every 5 ms) until `condition` holds or
    /// `timeout` seconds pass. Returns whether it held.
    @discardableResult
    public func waitUntil(timeout: Double = 10, _ condition: () -> Bool) -> Bool {
        let deadline = SimulatedVhostUserFrontend.now() + timeout
        while true {
            if condition() { return true }
            if SimulatedVhostUserFrontend.now() > deadline { return false }
            var descriptors = calls.map { pollfd(fd: $0.rawValue, events: Int16(POLLIN), revents: 0) }
            _ = poll(&descriptors, nfds_t(descriptors.count), 5)
            for call in calls { _ = try? call.drain() }
        }
    }

    /// Waits for `count` frames on pair `pair` and returns those that came.
    public func receive(count: Int, pair: Int = 0, timeout: Double = 10) -> [[UInt8]] {
        var frames: [[UInt8]] = []
        waitUntil(timeout: timeout) {
            frames += receivedFrames(pair: pair)
            return frames.count >= count
        }
        return frames
    }

    /// Whether `condition` stays true for `duration` seconds (for things that must not happen).
    public func holds(for duration: Double, _ condition: () -> Bool) -> Bool {
        !waitUntil(timeout: duration) { !condition() }
    }
}

/// Little-endian encoding, spelled out.
public enum LittleEndian {
    public static func u32(_ value: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: value >> (8 * UInt32($0))) } }
    public static func u64(_ value: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) } }
    public static func u16(_ value: UInt16) -> [UInt8] { [UInt8(truncatingIfNeeded: value), UInt8(truncatingIfNeeded: value >> 8)] }
    public static func u32(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[offset + $1]) << (8 * UInt32($1)) }
    }
    public static func u64(_ bytes: [UInt8], at offset: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[offset + $1]) << (8 * UInt64($1)) }
    }
    public static func u16(_ bytes: [UInt8], at offset: Int) -> UInt16 { UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8 }
}
