#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Logging
import Metrics
import Prometheus
import VirtioNetDaemon

struct VirtioNetd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "virtio-netd",
        abstract: "A virtio-net device backend that serves vhost-user frontends (QEMU, Cloud Hypervisor, DPDK) with TAP interfaces.",
        discussion: "Example configuration: config/virtio-netd.toml. SIGINT or SIGTERM stops every device, removes the sockets and deletes the TAPs the daemon created.",
        version: "virtio-netd 0.1.0"
    )

    @Option(name: .long, help: ArgumentHelp("Run the devices described in this TOML file.", valueName: "file"))
    var config: String?

    @Option(name: .customLong("check-config"), help: ArgumentHelp("Validate this TOML file, print its devices and exit.", valueName: "file"))
    var checkConfig: String?

    func validate() throws {
        guard (config == nil) != (checkConfig == nil) else {
            throw ValidationError("Give exactly one of --config FILE or --check-config FILE.")
        }
    }

    func run() throws {
        if let path = checkConfig {
            let configuration = try load(path)
            print("\(path): valid, \(configuration.devices.count) device(s)")
            for device in configuration.devices {
                let offloads = device.offloads.map { set in DaemonConfiguration.offloadNames.filter { set.contains($0.value) }.keys.sorted().joined(separator: ",") } ?? "all the TAP supports"
                print("  \(device.name): socket \(device.socket) (\(device.mode.rawValue)), tap \(device.tap), \(device.queuePairs) queue pair(s) of \(device.queueSize), mac \(device.mac), mtu \(device.mtu), offloads \(offloads), handshake timeout \(device.handshakeTimeout)")
            }
            if let metrics = configuration.metrics { print("  metrics: http://\(metrics.host):\(metrics.port)/metrics") }
            let limits = DescriptorLimit.current
            let budget = DescriptorBudget(configuration: configuration, limit: limits?.hard ?? 0)
            print("  descriptors: up to \(budget.total) (\(budget.devices.map { "\($0.name) \($0.need.total)" }.joined(separator: ", ")), the rest for the daemon)"
                  + (limits.map { "; the hard limit here is \($0.hard)\(budget.exceedsLimit ? ", too low" : "")" } ?? ""))
            return
        }
        let configuration = try load(config!)

        // Signals are taken by sigwait below: block them before any thread starts.
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGINT)
        sigaddset(&signals, SIGTERM)
        pthread_sigmask(SIG_BLOCK, &signals, nil)

        let level = configuration.logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "virtio-netd")
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))

        // Before any device opens a descriptor: many queue pairs need many more than 1024.
        let limit = DescriptorLimit.raise(logger: logger)
        DescriptorBudget(configuration: configuration, limit: limit).log(to: logger)

        let daemon = Daemon(configuration: configuration, logger: logger)
        let failures = daemon.start()
        if failures.count == configuration.devices.count {
            logger.critical("no device could start")
            throw ExitCode(1)
        }
        var metricsServer: MetricsServer?
        if let endpoint = configuration.metrics {
            do {
                let server = try MetricsServer(host: endpoint.host, port: endpoint.port, logger: logger) {
                    daemon.updateMetrics()
                    return registry.emitToString()
                }
                try server.start()
                metricsServer = server
                logger.info("metrics endpoint listening", metadata: ["address": "\(endpoint.host):\(server.port)"])
            } catch {
                logger.error("metrics endpoint failed to start", metadata: ["error": "\(error)"])
            }
        }
        logger.info("virtio-netd running", metadata: ["devices": "\(daemon.devices.count)"])

        var received: Int32 = 0
        sigwait(&signals, &received)
        logger.info("stopping", metadata: ["signal": "\(received == SIGINT ? "SIGINT" : "SIGTERM")"])
        metricsServer?.stop()
        daemon.stop()
        logger.info("virtio-netd stopped")
    }

    private func load(_ path: String) throws -> DaemonConfiguration {
        do {
            return try DaemonConfiguration.load(path: path)
        } catch {
            FileHandleOutput.standardError("virtio-netd: \(error)\n")
            throw ExitCode(2)
        }
    }
}

enum FileHandleOutput {
    static func standardError(_ text: String) {
        var bytes = Array(text.utf8)
        _ = bytes.withUnsafeMutableBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
    }
}

VirtioNetd.main()
