import Foundation
import Testing
import NetworkTestSupport
import Synchronization
import Tap
import VirtioNet
import VirtioNetTestSupport

/// The simulated guest: 52:54:00:00:00:01, 198.18.0.1 and fd00::1.
enum Guest {
    static let mac = MACAddress(0x52, 0x54, 0x00, 0x00, 0x00, 0x01)
    static let macBytes = mac.array
    static let ipv4 = Address.ip("198.18.0.1")
    static let ipv6 = Address.ip("fd00::1")
}

/// The peer in namespace B: 52:54:00:00:00:02, 198.18.0.2/24 and fd00::2/64.
enum Peer {
    static let mac = Address.mac("52:54:00:00:00:02")
    static let ipv4 = Address.ip("198.18.0.2")
    static let ipv6 = Address.ip("fd00::2")
}

enum IPVersion: String, CustomTestStringConvertible, Sendable {
    case v4, v6
    var testDescription: String { rawValue == "v4" ? "IPv4" : "IPv6" }
    /// Guest to peer.
    var outbound: IPAddresses {
        self == .v4 ? .v4(source: Guest.ipv4, destination: Peer.ipv4) : .v6(source: Guest.ipv6, destination: Peer.ipv6)
    }
}

/// The device under test on a real network:
///
/// ```
///  SimulatedNetDriver (guest 198.18.0.1)        namespace A                      namespace B
///     rings in memfd  <->  NetDevice  <->  TAP --+-- br0 -- veth-a ====== veth-b 198.18.0.2
///                          (worker threads)
/// ```
/// `with` builds the namespaces (see ``BridgedPeer``), opens the TAP from a thread inside A, makes it
/// a bridge port, creates `NetDevice(configuration:backend: TapBackend(tap:))` and lets the simulated
/// driver negotiate and activate it with worker threads. The device is reset and the namespaces are
/// deleted afterwards, also when the body throws.
final class PacketPathFixture: @unchecked Sendable {
    let network: BridgedPeer
    let tapName: String
    let tap: TapDevice
    let device: NetDevice
    let driver: SimulatedNetDriver

    private init(network: BridgedPeer, tapName: String, tap: TapDevice, device: NetDevice, driver: SimulatedNetDriver) {
        self.network = network
        self.tapName = tapName
        self.tap = tap
        self.device = device
        self.driver = driver
    }

    /// The namespaces' layout: B knows the guest's addresses statically, so it never resolves them.
    static func networkConfiguration(mtu: Int = 1500) -> BridgedPeer.Configuration {
        BridgedPeer.Configuration(
            mtu: mtu, peerMAC: Peer.mac, peerIPv4: "198.18.0.2/24", peerIPv6: "fd00::2/64",
            neighbours: [
                .init(ip: "198.18.0.1", mac: Guest.macBytes),
                .init(ip: "fd00::1", mac: Guest.macBytes),
            ])
    }

    private static let tapCounter = Atomic<Int>(0)

    /// "vpp-PID-N", unique in this run (the TAP lives in the test's namespace, but its name also tells
    /// its descriptors apart in /proc/self/fdinfo).
    static func uniqueTapName() -> String {
        let number = tapCounter.add(1, ordering: .relaxed).newValue
        return String("vpp\(getpid() % 100_000)-\(number)".prefix(15))
    }

    /// Opens a TAP named `name` with `queuePairs` queues from a thread inside A, gives it the network's
    /// MTU with `TapDevice.setMTU`, and makes it a port of A's bridge.
    static func openTap(in network: BridgedPeer, name: String, queuePairs: Int) async throws -> TapDevice {
        let tap = try await network.bridgeSide.run { try TapDevice.open(name: name, queuePairs: queuePairs) }
        try tap.setMTU(network.configuration.mtu)
        try network.attach(name)
        return tap
    }

    static func with<Result>(
        mtu: Int = 1500, queuePairs: Int = 1, wanted: VirtioNetFeatures? = nil,
        _ body: (PacketPathFixture) async throws -> Result
    ) async throws -> Result {
        try await BridgedPeer.with(networkConfiguration(mtu: mtu)) { network in
            let name = uniqueTapName()
            let tap = try await openTap(in: network, name: name, queuePairs: queuePairs)
            let device = try NetDevice(
                configuration: NetConfiguration(mac: Guest.mac, mtu: mtu, queuePairs: queuePairs),
                backend: TapBackend(tap: tap))
            defer { device.reset() }
            let driver = try SimulatedNetDriver(device: device, wanted: wanted, threaded: true)
            let fixture = PacketPathFixture(network: network, tapName: name, tap: tap, device: device, driver: driver)
            return try await body(fixture)
        }
    }

    /// The worker thread of queue pair `pair` of this device: the thread called "vnet-qpN" that
    /// sleeps in epoll_wait on the epoll watching this TAP's queue. Waits (up to 10 s) until the
    /// worker is idle in epoll_wait.
    func workerThread(pair: Int) -> Int32? {
        ProcessResources.workerThread(named: "vnet-qp\(pair)", watching: tap.fd(queue: pair))
    }

    /// `counter` once it has reached `value` (or after 10 s). A worker adds up a pass's frames at the end
    /// of the pass, after the frames themselves have moved, so a test that has just seen a frame
    /// arrive waits for the count.
    func settled(_ counter: Counter, at value: UInt64) -> UInt64 {
        driver.waitUntil { counter.current >= value }
        return counter.current
    }

    /// The TAP's kernel counters (its RX: frames the device wrote into it; its TX: frames the kernel
    /// queued for the device to read).
    func tapStatistics() throws -> Link.Statistics {
        try Link.details(network.bridgeSide, tapName).statistics
    }

    /// Sockets made inside B (a UDP socket bound to the peer's address, a packet socket on veth-b).
    func peerUDP(port: UInt16, v6: Bool = false) async throws -> TestSocket {
        try await network.peer.run { v6 ? try TestSocket.udp6(bindTo: Peer.ipv6, port: port) : try TestSocket.udp(bindTo: Peer.ipv4, port: port) }
    }

    func peerCapture() async throws -> TestSocket {
        let interface = network.peerInterface
        return try await network.peer.run { try TestSocket.packet(interface: interface) }
    }
}

extension ProcessResources {
    /// The thread called `name` blocked in epoll_wait on an epoll that watches `fd`; waits up to
    /// `timeout` for it to be there (a busy worker is not in epoll_wait at every instant).
    static func workerThread(named name: String, watching fd: Int32, timeout: Duration = .seconds(10)) -> Int32? {
        var found: Int32?
        Wait.until(timeout: timeout) {
            let epolls = descriptors().filter { $0.value.isEpoll && $0.value.watches.contains(fd) }.keys
            let names = threads()
            found = epolls.flatMap { threads(waitingOnEpoll: $0) }.first { names[$0] == name }
            return found != nil
        }
        return found
    }
}

extension SimulatedNetDriver {
    /// Transmits `frame` on `pair`, first taking back completed chains; if the ring is full, waits
    /// (up to 10 s) for the device to complete some. Returns whether the frame went into the ring.
    @discardableResult
    func send(_ frame: [UInt8], header: VirtioNetHeader = VirtioNetHeader(), pair: Int = 0) -> Bool {
        _ = completedTransmits(pair: pair)
        if transmit(frame, header: header, pair: pair) { return true }
        return waitUntil {
            _ = completedTransmits(pair: pair)
            return transmit(frame, header: header, pair: pair)
        }
    }

    /// Collects the frames the device delivers on `pairs` until `done` says so or `timeout` seconds
    /// pass, posting a fresh `bufferSize`-byte buffer for every buffer used, so the ring never runs dry.
    func collect(pairs: [Int] = [0], timeout: Double = 15, bufferSize: Int = 2048,
                 until done: ([(pair: Int, frame: ReceivedFrame)]) -> Bool) -> [(pair: Int, frame: ReceivedFrame)] {
        var frames: [(pair: Int, frame: ReceivedFrame)] = []
        waitUntil(timeout: timeout) {
            for pair in pairs {
                let new = receivedFrames(pair: pair)
                frames += new.map { (pair, $0) }
                let used = new.reduce(0) { $0 + $1.buffers }
                if used > 0 { postReceiveBuffers(pair: pair, count: used, size: bufferSize) }
            }
            return done(frames)
        }
        return frames
    }

    /// The first frame on `pair` that `predicate` accepts (parsed), collecting as above; nil on timeout.
    func firstFrame(pair: Int = 0, timeout: Double = 15, where predicate: (ParsedFrame) -> Bool) -> (ReceivedFrame, ParsedFrame)? {
        var match: (ReceivedFrame, ParsedFrame)?
        var scanned = 0
        _ = collect(pairs: [pair], timeout: timeout) { frames in
            while match == nil && scanned < frames.count {
                let received = frames[scanned].frame
                if let parsed = ParsedFrame(received.frame), predicate(parsed) { match = (received, parsed) }
                scanned += 1
            }
            return match != nil
        }
        return match
    }
}

/// A flag one thread sets and another polls.
final class StopFlag: Sendable {
    private let value = Atomic<Bool>(false)
    private let progress = Atomic<Int>(0)
    func set() { value.store(true, ordering: .releasing) }
    var isSet: Bool { value.load(ordering: .acquiring) }
    /// What the stoppable work has done so far (for a test to wait on before it stops it).
    func advance() { progress.add(1, ordering: .relaxed) }
    var done: Int { progress.load(ordering: .relaxed) }
}
