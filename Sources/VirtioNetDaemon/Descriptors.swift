import Logging
import Sys
import VhostUser

/// The most file descriptors one device may hold at once, from its configuration. A device with many
/// queue pairs needs many, and every descriptor counts against the process's one RLIMIT_NOFILE, so
/// one large device could starve the others' accept, epoll and eventfd creation.
public struct DescriptorNeed: Equatable, Sendable {
    /// Kick, call and error eventfds from the frontend: three for each of the 2 rings per queue pair.
    public var ringEventFDs: Int
    /// One TAP queue per queue pair, and the socket for the TAP's interface ioctls.
    public var tap: Int
    /// An io_uring per TAP queue (made by its worker for transmit bursts).
    public var ioUrings: Int
    /// An epoll instance and a stop eventfd per queue pair's worker thread.
    public var workers: Int
    /// The service's stop eventfd and its connection; in server mode also the listener, and a second
    /// connection for the moment it takes to close it.
    public var service: Int
    /// Descriptors one vhost-user message carries (SET_MEM_TABLE's region memfds), held while it is
    /// handled.
    public var message: Int

    public var total: Int { ringEventFDs + tap + ioUrings + workers + service + message }

    public init(device: DeviceConfiguration) {
        let pairs = device.queuePairs
        ringEventFDs = 3 * 2 * pairs
        tap = pairs + 1
        ioUrings = pairs
        workers = 2 * pairs
        service = device.mode == .server ? 4 : 2
        message = VhostUserBackend.memTableRegions
    }
}

/// The descriptor needs of every device against the process's limit.
public struct DescriptorBudget: Sendable {
    /// What the daemon holds besides its devices: standard input, output and error, the TAP
    /// watcher's stop eventfd and netlink socket, and a margin for the runtime and the configuration file.
    public static let baseline = 16
    /// The metrics endpoint: its listener, its stop eventfd and a connection per client it serves.
    public static let metricsEndpoint = 2 + MetricsServer.defaultMaximumClients

    public let devices: [(name: String, need: DescriptorNeed)]
    /// Devices, baseline and the metrics endpoint, if configured.
    public let total: Int
    /// The soft RLIMIT_NOFILE in force.
    public let limit: UInt64

    public init(configuration: DaemonConfiguration, limit: UInt64) {
        devices = configuration.devices.map { ($0.name, DescriptorNeed(device: $0)) }
        total = devices.reduce(Self.baseline + (configuration.metrics == nil ? 0 : Self.metricsEndpoint)) { $0 + $1.need.total }
        self.limit = limit
    }

    /// The devices may need more descriptors than the limit allows.
    public var exceedsLimit: Bool { UInt64(total) > limit }

    /// Logs each device's need (info) and, if the sum is over the limit, a warning.
    public func log(to logger: Logger) {
        for (name, need) in devices {
            logger.info("device descriptor need", metadata: [
                "device": "\(name)", "descriptors_worst_case": "\(need.total)", "ring_eventfds": "\(need.ringEventFDs)",
                "tap": "\(need.tap)", "io_urings": "\(need.ioUrings)", "workers": "\(need.workers)",
                "service": "\(need.service)", "message": "\(need.message)",
            ])
        }
        if exceedsLimit {
            logger.warning("descriptor limit below what the devices may need: frontends may fail to connect or start their rings", metadata: [
                "needed": "\(total)", "limit": "\(limit)", "devices": "\(devices.count)",
                "hint": "raise the hard RLIMIT_NOFILE (LimitNOFILE= in a systemd unit, ulimit -Hn) or configure fewer queue pairs",
            ])
        }
    }
}

/// The process's descriptor limit, as the daemon sets it up.
public enum DescriptorLimit {
    /// The soft and hard RLIMIT_NOFILE now; nil if they cannot be read.
    public static var current: (soft: UInt64, hard: UInt64)? { try? OpenFileLimit.current() }

    /// Raises the soft RLIMIT_NOFILE to the hard limit (the 1024 many systems start with is far too
    /// few for devices with many queue pairs) and logs what it did. Returns the soft limit in force.
    @discardableResult
    public static func raise(logger: Logger) -> UInt64 {
        do {
            let (previous, now) = try OpenFileLimit.raiseSoftToHard()
            logger.info("descriptor limit", metadata: ["soft_before": "\(previous)", "soft": "\(now)"])
            return now
        } catch {
            let soft = (try? OpenFileLimit.current().soft) ?? 0
            logger.warning("descriptor limit could not be raised", metadata: ["error": "\(error)", "soft": "\(soft)"])
            return soft
        }
    }
}
