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
            // Zero allocations per frame: a sample of 1000 frames allocates no more than the harness
            // does around an empty loop (16 to 18 here); one allocation per frame would add 1000.
            .mallocCountTotal: .init(absolute: [.p90: 4]),
            // Shared, noisy machines: only a large regression should fail the check.
            .throughput: .init(relative: [.p50: 50]),
            .wallClock: .init(relative: [.p50: 100]),
        ]
    )

    // The harness's own allocations per sample, so the others can be read against it.
    Benchmark("baseline_empty_loop") { benchmark in
        for _ in benchmark.scaledIterations { blackHole(0) }
    }

    for size in [64, 1500, 65536] {
        Benchmark("transmit_\(size)B") { benchmark, bench in
            for _ in benchmark.scaledIterations { bench.oneFrame() }
        } setup: {
            try TransmitBench(size: size)
        }
        Benchmark("receive_\(size)B") { benchmark, bench in
            for _ in benchmark.scaledIterations { bench.oneFrame() }
        } setup: {
            try ReceiveBench(size: size)
        }
    }
}
