// swift-tools-version:6.1
// Micro-benchmarks of the data path (ordo-one/benchmark), kept out of the main package's dependencies.
// Run: cd Benchmarks && swift package benchmark        Check thresholds: swift package benchmark thresholds check
import PackageDescription

let package = Package(
    name: "Benchmarks",
    dependencies: [
        .package(name: "swift-virtio-net", path: ".."),
        .package(url: "https://github.com/ordo-one/benchmark.git", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .target(
            name: "DataPathHarness",
            dependencies: [
                .product(name: "VirtioNet", package: "swift-virtio-net"),
                .product(name: "VirtioNetTestSupport", package: "swift-virtio-net"),
            ],
            swiftSettings: [.unsafeFlags(["-cross-module-optimization"])]
        ),
        .executableTarget(
            name: "InstructionCount",
            dependencies: ["DataPathHarness"],
            swiftSettings: [.unsafeFlags(["-cross-module-optimization"])]
        ),
        .executableTarget(
            name: "DataPath",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                "DataPathHarness",
            ],
            path: "Benchmarks/DataPath",
            swiftSettings: [.unsafeFlags(["-cross-module-optimization"])],
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
