#if canImport(Glibc)
import Glibc
#endif
import Logging
import Metrics
import Synchronization
import Sys
import Tap
import VhostUser
import VirtioNet

/// A device the daemon runs: its TAP, its `NetDevice` and the vhost-user service in front of it.
public final class RunningDevice: Sendable {
    public let configuration: DeviceConfiguration
    public let backend: TapBackend
    public let device: NetDevice
    public let service: VhostUserService
    /// The most descriptors the device may hold, from its configuration.
    public let descriptorNeed: DescriptorNeed
    let metrics: DeviceMetrics

    init(configuration: DeviceConfiguration, backend: TapBackend, device: NetDevice, service: VhostUserService) {
        self.configuration = configuration
        self.backend = backend
        self.device = device
        self.service = service
        descriptorNeed = DescriptorNeed(device: configuration)
        metrics = DeviceMetrics(name: configuration.name, device: device, worstCaseDescriptors: descriptorNeed.total,
                                heldDescriptors: { [service, device, backend] in
                                    service.descriptorCount + device.descriptorCount + backend.descriptorCount
                                })
    }

    /// Descriptors the device holds now: the service's (listener, connection, the frontend's ring
    /// eventfds), the workers' and the TAP's.
    public var descriptorCount: Int { service.descriptorCount + device.descriptorCount + backend.descriptorCount }
}

/// Runs every configured device; one that fails to start is logged and the others go on.
public final class Daemon: Sendable {
    public let configuration: DaemonConfiguration
    private let logger: Logger
    private let running = Mutex<[RunningDevice]>([])

    public init(configuration: DaemonConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    public var devices: [RunningDevice] { running.withLock { $0 } }

    /// Starts each device; returns the names and errors of those that could not start.
    @discardableResult
    public func start() -> [(name: String, error: String)] {
        var failures: [(String, String)] = []
        for device in configuration.devices {
            do {
                let started = try startDevice(device)
                running.withLock { $0.append(started) }
                logger.info("device started", metadata: [
                    "device": "\(device.name)", "socket": "\(device.socket)", "mode": "\(device.mode.rawValue)",
                    "tap": "\(started.backend.tap.name)", "tap_created": "\(started.backend.tap.createdByUs)",
                    "queue_pairs": "\(device.queuePairs)", "features": "\(started.device.offeredFeatures)",
                    "descriptors": "\(started.descriptorCount)", "descriptors_worst_case": "\(started.descriptorNeed.total)",
                ])
            } catch {
                logger.error("device failed to start", metadata: ["device": "\(device.name)", "error": "\(error)"])
                failures.append((device.name, "\(error)"))
            }
        }
        return failures
    }

    private func startDevice(_ configuration: DeviceConfiguration) throws -> RunningDevice {
        let backend = try TapBackend(name: configuration.tap, queuePairs: configuration.queuePairs)
        try backend.tap.setMTU(configuration.mtu)
        try backend.tap.setLinkUp(true)
        var deviceLogger = logger
        deviceLogger[metadataKey: "device"] = "\(configuration.name)"
        let device = try NetDevice(
            configuration: NetConfiguration(
                mac: configuration.mac, mtu: configuration.mtu, queuePairs: configuration.queuePairs,
                maximumQueueSize: configuration.queueSize, offloads: configuration.offloads
            ),
            backend: backend, logger: deviceLogger
        )
        let service = try VhostUserService(path: configuration.socket, mode: configuration.mode, device: device, logger: deviceLogger,
                                           handshakeTimeout: configuration.handshakeTimeout,
                                           memoryLimit: configuration.maximumGuestMemory)
        try service.start()
        return RunningDevice(configuration: configuration, backend: backend, device: device, service: service)
    }

    /// Stops every device: no more connections, workers stopped, sockets removed. TAPs the daemon
    /// created disappear when their descriptors close, with the last reference to each device.
    public func stop() {
        let devices = running.withLock { devices in
            defer { devices.removeAll() }
            return devices
        }
        for device in devices {
            device.service.stop()
            device.device.reset()
            logger.info("device stopped", metadata: ["device": "\(device.configuration.name)"])
        }
    }

    /// Brings the swift-metrics counters up to date with the devices' own counters.
    public func updateMetrics() {
        for device in devices { device.metrics.update() }
        if let limit = try? OpenFileLimit.current().soft { descriptorLimit.record(Int64(clamping: limit)) }
    }

    private let descriptorLimit = Gauge(label: "virtio_net_descriptor_limit")
}

/// swift-metrics counters for one device, fed from the data path's own (cheap, atomic) counters:
/// nothing is recorded per packet through swift-metrics.
final class DeviceMetrics: Sendable {
    private struct Feed {
        let read: @Sendable () -> UInt64
        let counter: Metrics.Counter
    }
    private let feeds: [Feed]
    private let last: Mutex<[UInt64]>
    private let heldDescriptors: @Sendable () -> Int
    private let heldGauge: Gauge
    private let worstCaseGauge: Gauge
    private let worstCase: Int

    init(name: String, device: NetDevice, worstCaseDescriptors: Int, heldDescriptors: @escaping @Sendable () -> Int) {
        self.heldDescriptors = heldDescriptors
        worstCase = worstCaseDescriptors
        heldGauge = Gauge(label: "virtio_net_descriptors_held", dimensions: [("device", name)])
        worstCaseGauge = Gauge(label: "virtio_net_descriptors_worst_case", dimensions: [("device", name)])
        var feeds: [Feed] = []
        for (pair, counters) in device.queuePairCounters.enumerated() {
            for (direction, queue) in [("rx", counters.receive), ("tx", counters.transmit)] {
                let dimensions = [("device", name), ("queue", "\(direction)\(pair)")]
                feeds.append(Feed(read: { queue.frames.current }, counter: Counter(label: "virtio_net_frames_total", dimensions: dimensions)))
                feeds.append(Feed(read: { queue.bytes.current }, counter: Counter(label: "virtio_net_bytes_total", dimensions: dimensions)))
                feeds.append(Feed(read: { queue.kicks.current }, counter: Counter(label: "virtio_net_kicks_total", dimensions: dimensions)))
                feeds.append(Feed(read: { queue.interrupts.current }, counter: Counter(label: "virtio_net_interrupts_total", dimensions: dimensions)))
                for reason in DropReason.allCases {
                    feeds.append(Feed(read: { queue.dropped(reason) },
                                      counter: Counter(label: "virtio_net_drops_total", dimensions: dimensions + [("reason", "\(reason)")])))
                }
            }
        }
        self.feeds = feeds
        last = Mutex(Array(repeating: 0, count: feeds.count))
    }

    func update() {
        heldGauge.record(heldDescriptors())
        worstCaseGauge.record(worstCase)
        last.withLock { last in
            for (index, feed) in feeds.enumerated() {
                let value = feed.read()
                if value > last[index] {
                    feed.counter.increment(by: Int64(truncatingIfNeeded: value - last[index]))
                    last[index] = value
                }
            }
        }
    }
}
