// TX and RX through the device with a simulated guest and a backend that costs nothing (SinkBackend),
// so the figures are the device's own: descriptor walking, validation, iovec building, used-ring
// publication, notification decisions. One scaled iteration is one frame; the guest posts and the
// device processes in bursts of `burst` frames, as a real driver and worker do.
import Benchmark
import GuestMemory
import VirtioNet
import VirtioNetTestSupport

let mac = MACAddress(0x52, 0x54, 0x00, 0x00, 0x00, 0x01)
let burst = 256

func frame(_ size: Int) -> [UInt8] {
    mac.array + [0x52, 0x54, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00] + [UInt8](repeating: 0xab, count: size - 14)
}

/// The device in manual mode with a transmit ring full of `size`-byte frames, recycled after use.
final class TransmitBench {
    let device: NetDevice
    let driver: SimulatedNetDriver
    let queue: SimulatedQueue
    var pending = 0

    init(size: Int) throws {
        let backend = try SinkBackend()
        device = try NetDevice(configuration: NetConfiguration(mac: mac, mtu: 65535, maximumQueueSize: 1024), backend: backend)
        driver = try SimulatedNetDriver(device: device, queueSize: burst, guest: SimulatedGuestMemory(regionSize: 64 << 20))
        driver.drive = { _ in }
        queue = driver.transmitQueues[0]
        for _ in 0..<burst { driver.transmit(frame(size)) }
        device.poll()
        queue.recycleUsed()
    }

    @inline(__always) func oneFrame() {
        pending += 1
        if pending == burst {
            device.poll()
            queue.recycleUsed()
            pending = 0
        }
    }
}

/// The device in manual mode receiving `size`-byte frames into recycled guest buffers.
final class ReceiveBench {
    let device: NetDevice
    let driver: SimulatedNetDriver
    let queue: SimulatedQueue
    let backend: SinkBackend
    let framesPerPoll: Int
    var pending = 0

    init(size: Int) throws {
        backend = try SinkBackend(receiveFrame: VirtioNetHeader().bytes + frame(size))
        device = try NetDevice(configuration: NetConfiguration(mac: mac, mtu: 65535, maximumQueueSize: 1024), backend: backend)
        driver = try SimulatedNetDriver(device: device, queueSize: 1024, guest: SimulatedGuestMemory(regionSize: 64 << 20))
        driver.drive = { _ in }
        queue = driver.receiveQueues[0]
        // Mergeable 4 KiB buffers, like a Linux guest's; 64 KiB frames take 17 each.
        driver.postReceiveBuffers(count: 1024, size: 4096)
        framesPerPoll = min(burst, 1024 / ((size + 12 + 4095) / 4096) / 2)
        device.poll()
    }

    @inline(__always) func oneFrame() {
        pending += 1
        if pending == framesPerPoll {
            backend.receiveQuota = framesPerPoll
            device.poll()
            queue.recycleUsed()
            pending = 0
        }
    }
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.throughput, .instructions, .mallocCountTotal, .wallClock],
        scalingFactor: .kilo,
        maxDuration: .seconds(3),
        maxIterations: 1_000_000,
        thresholds: [
            // Zero allocations per frame in steady state: the whole run must not allocate at all.
            .mallocCountTotal: .init(absolute: [.p90: 0]),
        ]
    )

    for size in [64, 1500, 65536] {
        Benchmark("transmit \(size) B") { benchmark, bench in
            for _ in benchmark.scaledIterations { bench.oneFrame() }
        } setup: {
            try TransmitBench(size: size)
        }
        Benchmark("receive \(size) B") { benchmark, bench in
            for _ in benchmark.scaledIterations { bench.oneFrame() }
        } setup: {
            try ReceiveBench(size: size)
        }
    }
}
