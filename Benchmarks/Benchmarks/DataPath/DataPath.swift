// TX and RX through the device with a simulated guest and a backend that costs nothing (SinkBackend),
// so the figures are the device's own: descriptor walking, validation, iovec building, used-ring
// publication, notification decisions. One scaled iteration is one frame.
import Benchmark
import DataPathHarness

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
