/// vhost-user requests (QEMU docs/interop/vhost-user.rst, "Front-end message types").
public enum VhostUserRequest: UInt32, Sendable, CustomStringConvertible {
    case getFeatures = 1
    case setFeatures = 2
    case setOwner = 3
    case resetOwner = 4
    case setMemTable = 5
    case setLogBase = 6
    case setLogFD = 7
    case setVringNum = 8
    case setVringAddr = 9
    case setVringBase = 10
    case getVringBase = 11
    case setVringKick = 12
    case setVringCall = 13
    case setVringErr = 14
    case getProtocolFeatures = 15
    case setProtocolFeatures = 16
    case getQueueNum = 17
    case setVringEnable = 18
    case sendRARP = 19
    case netSetMTU = 20
    case setBackendReqFD = 21
    case iotlbMessage = 22
    case setVringEndian = 23
    case getConfig = 24
    case setConfig = 25
    case resetDevice = 34
    case vringKick = 35
    case getMaxMemSlots = 36
    case addMemReg = 37
    case remMemReg = 38
    case setStatus = 39
    case getStatus = 40

    public var description: String { "\(name)(\(rawValue))" }

    var name: String {
        switch self {
        case .getFeatures: "GET_FEATURES"
        case .setFeatures: "SET_FEATURES"
        case .setOwner: "SET_OWNER"
        case .resetOwner: "RESET_OWNER"
        case .setMemTable: "SET_MEM_TABLE"
        case .setLogBase: "SET_LOG_BASE"
        case .setLogFD: "SET_LOG_FD"
        case .setVringNum: "SET_VRING_NUM"
        case .setVringAddr: "SET_VRING_ADDR"
        case .setVringBase: "SET_VRING_BASE"
        case .getVringBase: "GET_VRING_BASE"
        case .setVringKick: "SET_VRING_KICK"
        case .setVringCall: "SET_VRING_CALL"
        case .setVringErr: "SET_VRING_ERR"
        case .getProtocolFeatures: "GET_PROTOCOL_FEATURES"
        case .setProtocolFeatures: "SET_PROTOCOL_FEATURES"
        case .getQueueNum: "GET_QUEUE_NUM"
        case .setVringEnable: "SET_VRING_ENABLE"
        case .sendRARP: "SEND_RARP"
        case .netSetMTU: "NET_SET_MTU"
        case .setBackendReqFD: "SET_BACKEND_REQ_FD"
        case .iotlbMessage: "IOTLB_MSG"
        case .setVringEndian: "SET_VRING_ENDIAN"
        case .getConfig: "GET_CONFIG"
        case .setConfig: "SET_CONFIG"
        case .resetDevice: "RESET_DEVICE"
        case .vringKick: "VRING_KICK"
        case .getMaxMemSlots: "GET_MAX_MEM_SLOTS"
        case .addMemReg: "ADD_MEM_REG"
        case .remMemReg: "REM_MEM_REG"
        case .setStatus: "SET_STATUS"
        case .getStatus: "GET_STATUS"
        }
    }

    /// Requests answered with a reply of their own (not only with REPLY_ACK).
    var hasReply: Bool {
        switch self {
        // SET_LOG_BASE is answered when the log comes as shared memory (LOG_SHMFD), the only way here.
        case .getFeatures, .getProtocolFeatures, .getVringBase, .getQueueNum, .getConfig, .getMaxMemSlots, .getStatus, .setLogBase: true
        default: false
        }
    }
}

/// Protocol feature bits (GET/SET_PROTOCOL_FEATURES).
public struct VhostUserProtocolFeatures: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let mq = Self(rawValue: 1 << 0)
    public static let logShmfd = Self(rawValue: 1 << 1)
    public static let rarp = Self(rawValue: 1 << 2)
    public static let replyAck = Self(rawValue: 1 << 3)
    public static let netMTU = Self(rawValue: 1 << 4)
    public static let backendReq = Self(rawValue: 1 << 5)
    public static let config = Self(rawValue: 1 << 9)
    public static let resetDevice = Self(rawValue: 1 << 13)
    public static let configureMemSlots = Self(rawValue: 1 << 15)
    public static let status = Self(rawValue: 1 << 16)

    /// What this backend implements.
    /// CONFIG is not offered: QEMU's net frontend does not use it and warns when a backend offers it
    /// (GET_CONFIG is still answered).
    public static let supported: Self = [.mq, .logShmfd, .rarp, .replyAck, .netMTU, .resetDevice, .configureMemSlots, .status]

    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// The 12-byte message header: request, flags, payload size (all little-endian u32).
public struct VhostUserHeader: Equatable, Sendable {
    public static let size = 12
    public static let versionMask: UInt32 = 0x3
    public static let version: UInt32 = 0x1
    public static let replyFlag: UInt32 = 0x4
    public static let needReplyFlag: UInt32 = 0x8
    /// No legitimate message is near this (SET_MEM_TABLE with 8 regions is 264 bytes).
    public static let maximumPayload: UInt32 = 4096

    public var request: UInt32
    public var flags: UInt32
    public var size: UInt32

    public init(request: UInt32, flags: UInt32, size: UInt32) {
        self.request = request
        self.flags = flags
        self.size = size
    }

    public init(bytes: [UInt8]) {
        var reader = PayloadReader(bytes)
        request = reader.u32() ?? 0
        flags = reader.u32() ?? 0
        size = reader.u32() ?? 0
    }

    public var bytes: [UInt8] {
        var writer = PayloadWriter()
        writer.u32(request)
        writer.u32(flags)
        writer.u32(size)
        return writer.bytes
    }

    public var needsReply: Bool { flags & Self.needReplyFlag != 0 }
}

/// Feature bit 30 of GET/SET_FEATURES: protocol features may be negotiated.
public let vhostUserProtocolFeaturesBit: UInt64 = 1 << 30

/// Feature bit 26 of GET/SET_FEATURES (VHOST_F_LOG_ALL): the backend logs the guest pages it writes
/// (live migration); the frontend sets it to start logging and clears it to stop.
public let vhostLogAllBit: UInt64 = 1 << 26

/// Little-endian fields out of an untrusted payload; every read is bounds-checked.
public struct PayloadReader {
    let bytes: [UInt8]
    var offset = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public var remaining: Int { bytes.count - offset }

    public mutating func u64() -> UInt64? {
        guard remaining >= 8 else { return nil }
        var value: UInt64 = 0
        for index in 0..<8 { value |= UInt64(bytes[offset + index]) << UInt64(8 * index) }
        offset += 8
        return value
    }

    public mutating func u32() -> UInt32? {
        guard remaining >= 4 else { return nil }
        var value: UInt32 = 0
        for index in 0..<4 { value |= UInt32(bytes[offset + index]) << UInt32(8 * index) }
        offset += 4
        return value
    }

    public mutating func take(_ count: Int) -> [UInt8]? {
        guard count >= 0, remaining >= count else { return nil }
        defer { offset += count }
        return Array(bytes[offset..<offset + count])
    }
}

/// Little-endian fields into a payload.
public struct PayloadWriter {
    public private(set) var bytes: [UInt8] = []
    public init() {}
    public mutating func u64(_ value: UInt64) { for index in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: value >> UInt64(8 * index))) } }
    public mutating func u32(_ value: UInt32) { for index in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: value >> UInt32(8 * index))) } }
    public mutating func append(_ data: [UInt8]) { bytes += data }
}

/// Why a message was refused; the text names the request and what was wrong.
public struct VhostUserError: Error, CustomStringConvertible, Sendable {
    public let message: String
    /// The connection must end (the stream cannot be trusted, or the frontend cannot be told).
    public let fatal: Bool
    public init(_ message: String, fatal: Bool = false) {
        self.message = message
        self.fatal = fatal
    }
    public var description: String { message }
}
