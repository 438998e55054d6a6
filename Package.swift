// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "swift-virtio-net",
    products: [
        .library(name: "VirtioNet", targets: ["VirtioNet"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-system.git", from: "1.8.1"),
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
        .target(name: "VirtioNetTestSupport", dependencies: ["VirtioNet", "Virtqueue", "GuestMemory", "Sys"]),
        .executableTarget(
            name: "LibraryExample",
            dependencies: ["VirtioNet", "VirtioNetTestSupport", "GuestMemory", .product(name: "Logging", package: "swift-log")],
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
            name: "VirtioNetTests",
            dependencies: ["VirtioNet", "VirtioNetTestSupport", "Virtqueue", "GuestMemory", "Sys"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
