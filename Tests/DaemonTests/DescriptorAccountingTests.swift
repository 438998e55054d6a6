import Testing
import VhostUser
import VirtioNet
import VirtioNetDaemon
import VirtioNetTestSupport

@Suite("Descriptor accounting: each device's worst case from its configuration, and what it holds")
struct DescriptorAccountingTests {
    func device(_ queuePairs: Int, mode: String = "server", name: String = "d") throws -> DeviceConfiguration {
        let text = "[[device]]\nname = \"\(name)\"\nsocket = \"/run/vu/\(name).sock\"\nmode = \"\(mode)\"\ntap = \"t\(name)\"\nqueue_pairs = \(queuePairs)\n"
        return try #require(try DaemonConfiguration.parse(text, file: "t.toml").devices.first)
    }

    @Test("Worst case per device: 3 eventfds per ring, a TAP queue and an io_uring per pair, the TAP's control socket, a worker's epoll and eventfd per pair, the service's descriptors, one message's")
    func worstCase() throws {
        let one = DescriptorNeed(device: try device(1))
        #expect(one.ringEventFDs == 6 && one.tap == 2 && one.ioUrings == 1 && one.workers == 2 && one.service == 4 && one.message == 8)
        #expect(one.total == 23)
        #expect(DescriptorNeed(device: try device(16)).total == 173)
        #expect(DescriptorNeed(device: try device(128)).total == 10 * 128 + 13)
        let client = DescriptorNeed(device: try device(1, mode: "client"))
        #expect(client.service == 2 && client.total == 21, "no listener and no refused connection in client mode")
    }

    @Test("The sum over devices, the daemon's own and the metrics endpoint's, against the limit")
    func budget() throws {
        let text = """
        [daemon]
        metrics = "127.0.0.1:9464"
        [[device]]
        name = "a"
        socket = "/run/vu/a.sock"
        tap = "ta"
        queue_pairs = 50
        [[device]]
        name = "b"
        socket = "/run/vu/b.sock"
        tap = "tb"
        queue_pairs = 50
        """
        let configuration = try DaemonConfiguration.parse(text, file: "t.toml")
        let budget = DescriptorBudget(configuration: configuration, limit: 1024)
        #expect(budget.devices.map(\.name) == ["a", "b"])
        #expect(budget.devices.map(\.need.total) == [513, 513])
        #expect(budget.total == 2 * 513 + DescriptorBudget.baseline + DescriptorBudget.metricsEndpoint)
        #expect(budget.exceedsLimit, "1026 for the devices alone is over 1024")
        #expect(!DescriptorBudget(configuration: configuration, limit: 4096).exceedsLimit)
        var withoutMetrics = configuration
        withoutMetrics.metrics = nil
        #expect(DescriptorBudget(configuration: withoutMetrics, limit: 4096).total == 2 * 513 + DescriptorBudget.baseline)
    }

    @Test("What a served device holds: the service's stop eventfd, listener and connection and the frontend's ring eventfds; an epoll and an eventfd per running worker")
    func heldByAServedDevice() throws {
        let served = try ServedDevice(queuePairs: 2)
        defer { served.stop() }
        #expect(served.service.descriptorCount == 2, "stop eventfd and listener")
        #expect(served.device.descriptorCount == 0, "no worker before a frontend")
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(), queuePairs: 2)
        #expect(roundTrip(guest, pair: 1, sizes: [60]))
        // 4 rings with a kick and a call each; the connection; the listener and the stop eventfd.
        #expect(eventually { served.service.descriptorCount == 2 + 1 + 8 }, "service holds \(served.service.descriptorCount)")
        #expect(served.device.descriptorCount == 4, "two workers")
        let worst = DescriptorNeed(device: try device(2))
        #expect(served.service.descriptorCount <= worst.ringEventFDs + worst.service)
        #expect(served.device.descriptorCount <= worst.workers)

        frontend.close()
        #expect(eventually { served.service.descriptorCount == 2 && served.device.descriptorCount == 0 }, "all given back when the frontend leaves")
        served.service.stop()
        #expect(served.service.descriptorCount == 1, "the stop eventfd is all that is left")
    }
}
