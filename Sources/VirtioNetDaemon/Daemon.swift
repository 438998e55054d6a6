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
///
/// A thread watches the devices' TAPs: when one disappears (an administrator deleted it), the device
/// stops, dropping its frontend, the TAP is made again with the same name, MTU and link state, and
/// the device starts on it; a frontend that reconnects (QEMU with `reconnect=1`) resumes. A TAP that
/// cannot be made again is retried with back-off, each failure logged with its reason.
public final class Daemon: Sendable {
    public let configuration: DaemonConfiguration
    private let logger: Logger
    private let running = Mutex<[RunningDevice]>([])
    private let watcher = Mutex<(thread: WorkerThread?, stop: EventFD?, stopping: Bool)>((nil, nil, false))

    public init(configuration: DaemonConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
    }

    public var devices: [RunningDevice] { running.withLock { $0 } }

    /// Starts each device, then the thread that watches their TAPs; returns the names and errors of
    /// the devices that could not start.
    @discardableResult
    public func start() -> [(name: String, error: String)] {
        var failures: [(String, String)] = []
        for device in configuration.devices {
            do {
                let started = try startDevice(device)
                running.withLock { $0.append(started) }
                logStarted(started, "device started")
            } catch {
                logger.error("device failed to start", metadata: ["device": "\(device.name)", "error": "\(error)"])
                failures.append((device.name, "\(error)"))
            }
        }
        if !devices.isEmpty { startWatcher() }
        return failures
    }

    private func logStarted(_ started: RunningDevice, _ message: Logger.Message) {
        let device = started.configuration
        logger.info(message, metadata: [
            "device": "\(device.name)", "socket": "\(device.socket)", "mode": "\(device.mode.rawValue)",
            "tap": "\(started.backend.tap.name)", "tap_created": "\(started.backend.tap.createdByUs)",
            "queue_pairs": "\(device.queuePairs)", "features": "\(started.device.offeredFeatures)",
            "descriptors": "\(started.descriptorCount)", "descriptors_worst_case": "\(started.descriptorNeed.total)",
        ])
    }

    /// How long a device waits for a single-queue TAP that another process holds. A virtio-netd that
    /// was killed holds its TAP a little longer than its life: the kernel tears its io_uring instances
    /// down (and with them their registered TAP descriptors) asynchronously after the exit, so the
    /// daemon restarted at once may find the TAP busy for a moment.
    static let busyTAPWait = Duration.seconds(10)

    private func openTAP(_ configuration: DeviceConfiguration) throws(TapError) -> TapBackend {
        let start = ContinuousClock.now
        var warned = false
        while true {
            do {
                let backend = try TapBackend(name: configuration.tap, queuePairs: configuration.queuePairs)
                if warned {
                    logger.info("TAP attached after waiting", metadata: [
                        "device": "\(configuration.name)", "tap": "\(configuration.tap)", "waited": "\(ContinuousClock.now - start)",
                    ])
                }
                return backend
            } catch {
                guard case .busy = error, ContinuousClock.now - start < Self.busyTAPWait else { throw error }
                if !warned {
                    warned = true
                    logger.warning("TAP busy: another process holds it (a killed virtio-netd may still be closing it); waiting", metadata: [
                        "device": "\(configuration.name)", "tap": "\(configuration.tap)", "at_most": "\(Self.busyTAPWait)",
                    ])
                }
                _ = try? waitReady([], timeoutMilliseconds: 50)  // a pause: poll on nothing
            }
        }
    }

    private func startDevice(_ configuration: DeviceConfiguration) throws -> RunningDevice {
        let backend = try openTAP(configuration)
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
        let (thread, stop) = watcher.withLock { watcher in
            watcher.stopping = true
            return (watcher.thread, watcher.stop)
        }
        try? stop?.signal()
        thread?.join()
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

    // MARK: Watching the TAPs

    /// The first wait before making a TAP again after a failure, and the longest.
    static let firstRetry = Duration.seconds(1)
    static let longestRetry = Duration.seconds(30)

    private func startWatcher() {
        do {
            let stop = try EventFD()
            let links = try LinkMonitor()
            watcher.withLock { $0.stop = stop }
            let thread = try WorkerThread(name: "vnet-tapwatch") { [self] in watch(stop: stop, links: links) }
            watcher.withLock { $0.thread = thread }
        } catch {
            logger.error("cannot watch the TAPs: a deleted TAP will not be made again", metadata: ["error": "\(error)"])
        }
    }

    /// A device waiting for its TAP to be made again.
    private struct Pending {
        let configuration: DeviceConfiguration
        var attempts = 0
        var retry = Daemon.firstRetry
        var next = ContinuousClock.now
    }

    /// Sleeps until a link of the namespace changes, then looks for devices whose TAP is gone and
    /// restarts them on new TAPs. The kernel sends RTM_DELLINK after it has detached the TAP's
    /// descriptors, so `isGone` is true by then; a second look a little later covers the rest.
    private func watch(stop: EventFD, links: LinkMonitor) {
        var pending: [Pending] = []
        var lookAgain: ContinuousClock.Instant? = nil
        while !watcher.withLock({ $0.stopping }) {
            let ready: [PollEvents]
            do {
                ready = try waitReady([(stop.rawValue, .readable), (links.fd, .readable)],
                                      timeoutMilliseconds: pollTimeout(until: earliest(lookAgain, pending.map(\.next).min())))
            } catch {
                logger.critical("the TAP watcher stopped: poll failed; a deleted TAP will not be made again", metadata: ["error": "\(error)"])
                return
            }
            if !ready[0].isEmpty { continue }
            let now = ContinuousClock.now
            var look = false
            if !ready[1].isEmpty && links.drain() {
                look = true
                lookAgain = now + .milliseconds(200)
            } else if let when = lookAgain, when <= now {
                look = true
                lookAgain = nil
            }
            if look {
                for device in devices where device.backend.tap.isGone {
                    logger.error("TAP is gone (deleted by someone else?): the device stops, drops its frontend and starts again on a new TAP", metadata: [
                        "device": "\(device.configuration.name)", "tap": "\(device.backend.tap.name)",
                    ])
                    running.withLock { $0.removeAll { $0 === device } }
                    device.service.stop()
                    device.device.reset()
                    pending.append(Pending(configuration: device.configuration))
                }
            }
            for index in pending.indices.reversed() where pending[index].next <= now {
                if watcher.withLock({ $0.stopping }) { return }
                pending[index].attempts += 1
                let attempt = pending[index]
                let name = attempt.configuration.name
                do {
                    let started = try startDevice(attempt.configuration)
                    running.withLock { $0.append(started) }
                    pending.remove(at: index)
                    logStarted(started, "device restarted on a new TAP")
                    logger.notice("device restarted on a new TAP: its frontend may reconnect; the TAP has no addresses until they are added again", metadata: [
                        "device": "\(name)", "tap": "\(started.backend.tap.name)", "attempts": "\(attempt.attempts)",
                    ])
                } catch {
                    logger.error("device cannot start again: retrying", metadata: [
                        "device": "\(name)", "tap": "\(attempt.configuration.tap)", "error": "\(error)",
                        "attempts": "\(attempt.attempts)", "retry_in": "\(attempt.retry)",
                    ])
                    pending[index].next = now + attempt.retry
                    pending[index].retry = min(attempt.retry * 2, Self.longestRetry)
                }
            }
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
