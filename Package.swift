// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "swift-virtio-net",
    products: [
        .library(name: "VirtioNet", targets: ["VirtioNet"]),
        .library(name: "VhostUser", targets: ["VhostUser"]),
        .executable(name: "virtio-netd", targets: ["virtio-netd"]),
        // For tests and the benchmarks package only; not a dependency of the library or the daemon.
        .library(name: "VirtioNetTestSupport", targets: ["VirtioNetTestSupport"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/LebJe/TOMLKit.git", from: "0.6.0"),
    ],
    targets: [
        // Only what Swift cannot import: GNU-only syscalls, ioctl request macros, CMSG, atomics on raw memory.
        .target(name: "CVirtioShim"),
        .target(
            name: "Sys",
            dependencies: ["CVirtioShim", .product(name: "SystemPackage", package: "swift-system")]
        ),
        .target(name: "GuestMemory", dependencies: ["Sys", "CVirtioShim"]),
        .target(name: "Virtqueue", dependencies: ["GuestMemory", "CVirtioShim"]),
        .target(name: "Tap", dependencies: ["Sys", "CVirtioShim"]),
        .target(
            name: "VirtioNet",
            dependencies: ["Virtqueue", "GuestMemory", "Tap", "Sys", "CVirtioShim", .product(name: "Logging", package: "swift-log")]
        ),
        .target(
            name: "VhostUser",
            dependencies: ["VirtioNet", "Virtqueue", "GuestMemory", "Sys", .product(name: "Logging", package: "swift-log")]
        ),
        // The daemon's parts (configuration, device lifecycle, metrics), a library so tests reach them.
        .target(
            name: "VirtioNetDaemon",
            dependencies: [
                "VhostUser", "VirtioNet", "Virtqueue", "Tap", "Sys", "CVirtioShim",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "TOMLKit", package: "TOMLKit"),
            ]
        ),
        .executableTarget(
            name: "virtio-netd",
            dependencies: [
                "VirtioNetDaemon",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(name: "VirtioNetTestSupport", dependencies: ["VirtioNet", "Virtqueue", "GuestMemory", "Sys"]),
        .executableTarget(
            name: "LibraryExample",
            dependencies: ["VirtioNet", "GuestMemory", "Sys", .product(name: "Logging", package: "swift-log")],
            path: "Examples/LibraryExample"
        ),
        // Test-only helpers for network namespaces, sockets and packets; never linked into products.
        .target(name: "NetworkTestSupport", dependencies: ["Sys", "CVirtioShim"]),
        .testTarget(name: "TapTests", dependencies: ["Tap", "Sys", "NetworkTestSupport"]),
        .testTarget(
            name: "PacketPathTests",
            dependencies: ["VirtioNet", "VirtioNetTestSupport", "NetworkTestSupport", "Tap", "Sys", "GuestMemory"]
        ),
        .testTarget(
            name: "DaemonTests",
            dependencies: [
                "VirtioNetDaemon", "VhostUser", "VirtioNet", "VirtioNetTestSupport", "NetworkTestSupport", "GuestMemory", "Sys",
                "Virtqueue", "CVirtioShim", .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "VirtioNetTests",
            dependencies: ["VirtioNet", "VirtioNetTestSupport", "Virtqueue", "GuestMemory", "Sys", .product(name: "Logging", package: "swift-log")]
        ),
    ],
    swiftLanguageModes: [.v6]
)
