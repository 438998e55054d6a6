import Foundation
import Glibc

/// Two namespaces made for one test and joined by a veth pair:
///
/// ```
/// namespace A (bridgeSide)                          namespace B (peer)
///   [your interface, e.g. a TAP] --+
///                                  br0 -- veth-a ====== veth-b  198.18.0.2/24, fd00::2/64
/// ```
/// A holds a bridge whose port is one end of the pair; B holds the other end with the peer's
/// addresses and static neighbour entries. A test attaches its own interface to the bridge with
/// ``attach(_:)`` and talks to B through it. A is purely layer 2 (IPv6 off, no addresses), so it
/// sends nothing on its own; B's IPv6 runs without duplicate address detection or router
/// solicitations. ``with(_:_:)`` deletes both namespaces afterwards, also on failure.
public final class BridgedPeer: Sendable {
    public struct Neighbour: Sendable {
        public var ip: String
        public var mac: [UInt8]
        public init(ip: String, mac: [UInt8]) {
            self.ip = ip
            self.mac = mac
        }
    }

    public struct Configuration: Sendable {
        /// MTU of the bridge and both veth ends (attached interfaces get it too).
        public var mtu: Int
        public var peerMAC: [UInt8]
        /// The peer's IPv4 address with prefix length, e.g. "198.18.0.2/24".
        public var peerIPv4: String
        /// The peer's IPv6 address with prefix length, or nil to leave IPv6 off in B too.
        public var peerIPv6: String?
        /// Permanent neighbour entries in B (so B never has to resolve the guest).
        public var neighbours: [Neighbour]
        /// Turns TSO, GSO and checksum offload off on veth-a (`ethtool -K veth-a tso off gso off tx off`),
        /// so that what leaves A towards B is cut into MTU-sized segments with complete checksums.
        public var softwareOffloadsOnBridgePort: Bool

        public init(mtu: Int = 1500, peerMAC: [UInt8], peerIPv4: String, peerIPv6: String? = nil,
                    neighbours: [Neighbour] = [], softwareOffloadsOnBridgePort: Bool = true) {
            self.mtu = mtu
            self.peerMAC = peerMAC
            self.peerIPv4 = peerIPv4
            self.peerIPv6 = peerIPv6
            self.neighbours = neighbours
            self.softwareOffloadsOnBridgePort = softwareOffloadsOnBridgePort
        }
    }

    public let bridgeSide: NetworkNamespace
    public let peer: NetworkNamespace
    public let configuration: Configuration
    public let bridge = "br0"
    public let bridgePort = "veth-a"
    public let peerInterface = "veth-b"

    private init(bridgeSide: NetworkNamespace, peer: NetworkNamespace, configuration: Configuration) {
        self.bridgeSide = bridgeSide
        self.peer = peer
        self.configuration = configuration
    }

    /// Builds the two namespaces, runs `body`, and deletes them, also when something throws.
    public static func with<Result>(_ configuration: Configuration, _ body: (BridgedPeer) async throws -> Result) async throws -> Result {
        try await NetworkNamespace.with { a in
            try await NetworkNamespace.with { b in
                let network = BridgedPeer(bridgeSide: a, peer: b, configuration: configuration)
                try await network.build()
                return try await body(network)
            }
        }
    }

    private func build() async throws {
        let c = configuration
        let a = bridgeSide, b = peer
        // Before any interface exists, so that every interface inherits the defaults.
        await a.sysctlBestEffort(["net/ipv6/conf/all/disable_ipv6": "1", "net/ipv6/conf/default/disable_ipv6": "1"])
        if c.peerIPv6 == nil {
            await b.sysctlBestEffort(["net/ipv6/conf/all/disable_ipv6": "1", "net/ipv6/conf/default/disable_ipv6": "1"])
        } else {
            await b.sysctlBestEffort([
                "net/ipv6/conf/default/accept_dad": "0", "net/ipv6/conf/all/accept_dad": "0",
                "net/ipv6/conf/default/dad_transmits": "0", "net/ipv6/conf/all/dad_transmits": "0",
                "net/ipv6/conf/default/router_solicitations": "0", "net/ipv6/conf/all/router_solicitations": "0",
                "net/ipv6/conf/default/accept_ra": "0", "net/ipv6/conf/all/accept_ra": "0",
            ])
        }
        let mtu = String(c.mtu)
        try a.ip("link", "add", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")
        try a.ip("link", "add", bridgePort, "type", "veth", "peer", "name", peerInterface, "netns", b.name,
                 "address", Address.macString(c.peerMAC))
        try a.ip("link", "set", bridgePort, "mtu", mtu, "master", bridge)
        if c.softwareOffloadsOnBridgePort {
            try a.exec(Command.ethtool, "-K", bridgePort, "tso", "off", "gso", "off", "tx", "off")
        }
        try a.ip("link", "set", bridge, "mtu", mtu, "up")
        try a.ip("link", "set", bridgePort, "up")
        try b.ip("link", "set", "lo", "up")
        // No link-local address either: B uses only the addresses the test gives it.
        try b.ip("link", "set", peerInterface, "mtu", mtu, "addrgenmode", "none")
        try b.ip("address", "add", c.peerIPv4, "dev", peerInterface)
        if let v6 = c.peerIPv6 {
            try b.ip("address", "add", v6, "dev", peerInterface, "nodad")
        }
        try b.ip("link", "set", peerInterface, "up")
        for neighbour in c.neighbours {
            try b.ip("neigh", "replace", neighbour.ip, "lladdr", Address.macString(neighbour.mac), "dev", peerInterface, "nud", "permanent")
        }
        let ready = try Wait.until(timeout: .seconds(15)) {
            try Link.details(a, bridgePort).isForwardingPort && Link.details(b, peerInterface).isUp
        }
        guard ready else { throw SetupError("\(bridgePort) and \(peerInterface) did not come up") }
        try await probeVethPair()
    }

    /// Sends a frame of a local experimental EtherType each way over the veth pair until it is seen,
    /// so that tests start only once both ends pass frames (a veth drops what it is asked to send
    /// until the kernel's link watcher has activated it, shortly after its carrier comes up).
    private func probeVethPair() async throws {
        let (a, b, port, peerSide) = (bridgeSide, peer, bridgePort, peerInterface)
        let aSocket = try await a.run { try TestSocket.packet(interface: port) }
        let bSocket = try await b.run { try TestSocket.packet(interface: peerSide) }
        for (from, to, direction) in [(aSocket, bSocket, "A to B"), (bSocket, aSocket, "B to A")] {
            let marker = Packet.pattern(count: 16, seed: UInt8(direction.count))
            let frame = Packet.ethernet(destination: Packet.broadcastMAC, source: [0x02, 0, 0, 0, 0, 0x99], type: 0x88B5, payload: marker)
            var seen = false
            let clock = ContinuousClock()
            let end = clock.now.advanced(by: .seconds(15))
            while !seen && clock.now < end {
                try from.sendFrame(frame)
                seen = try to.receiveAll(deadline: .milliseconds(50)) { bytes, type in
                    type != .outgoing && bytes.starts(with: frame)
                }
            }
            guard seen else { throw SetupError("no frame crossed the veth pair \(direction)") }
        }
    }

    /// Makes `interface` (in A) a bridge port with the configured MTU, brings it up, and waits until
    /// the bridge forwards through it.
    public func attach(_ interface: String) throws {
        try bridgeSide.ip("link", "set", interface, "mtu", String(configuration.mtu), "master", bridge)
        try bridgeSide.ip("link", "set", interface, "up")
        let ready = try Wait.until(timeout: .seconds(15)) {
            let details = try Link.details(bridgeSide, interface)
            return details.isForwardingPort && details.hasCarrier
        }
        guard ready else { throw SetupError("\(interface) did not become a forwarding bridge port") }
    }

    public struct SetupError: Error, CustomStringConvertible {
        public let description: String
        init(_ description: String) { self.description = description }
    }
}

extension NetworkNamespace {
    /// Sysctls that older kernels may not have: failures are ignored.
    func sysctlBestEffort(_ settings: [String: String]) async {
        _ = try? await run {
            for (key, value) in settings.sorted(by: { $0.key < $1.key }) { try? Sysctl.set(key, value) }
        }
    }
}

/// `ip -j -d -s link show` of one interface, the parts tests look at.
public struct Link: Sendable {
    public let flags: [String]
    public let operstate: String
    public let mtu: Int
    /// The bridge port state ("forwarding", ...) if the interface is a bridge port.
    public let bridgePortState: String?
    public let statistics: Statistics

    public struct Statistics: Sendable, Equatable {
        public var rxPackets: UInt64
        public var rxDropped: UInt64
        public var txPackets: UInt64
        public var txDropped: UInt64
    }

    public var isUp: Bool { flags.contains("UP") && flags.contains("LOWER_UP") && operstate != "DOWN" }
    public var hasCarrier: Bool { flags.contains("LOWER_UP") }
    public var isForwardingPort: Bool { isUp && bridgePortState == "forwarding" }

    public static func details(_ namespace: NetworkNamespace, _ interface: String) throws -> Link {
        let output = try namespace.ip("-j", "-d", "-s", "link", "show", "dev", interface)
        guard let list = try JSONSerialization.jsonObject(with: Data(output.utf8)) as? [[String: Any]], let link = list.first else {
            throw BridgedPeer.SetupError("cannot parse ip -j link show \(interface): \(output)")
        }
        let info = link["linkinfo"] as? [String: Any]
        let slave = info?["info_slave_data"] as? [String: Any]
        let stats = link["stats64"] as? [String: Any]
        let rx = stats?["rx"] as? [String: Any]
        let tx = stats?["tx"] as? [String: Any]
        func number(_ dictionary: [String: Any]?, _ key: String) -> UInt64 {
            (dictionary?[key] as? NSNumber)?.uint64Value ?? 0
        }
        return Link(
            flags: link["flags"] as? [String] ?? [], operstate: link["operstate"] as? String ?? "",
            mtu: (link["mtu"] as? NSNumber)?.intValue ?? 0, bridgePortState: slave?["state"] as? String,
            statistics: Statistics(rxPackets: number(rx, "packets"), rxDropped: number(rx, "dropped"),
                                   txPackets: number(tx, "packets"), txDropped: number(tx, "dropped")))
    }
}

/// Counters from /proc/net/snmp of the calling thread's namespace (read through /proc/thread-self).
public enum SNMP {
    /// The counters of one line pair of /proc/net/snmp, e.g. `counters("Udp")["InCsumErrors"]`.
    public static func counters(_ group: String) -> [String: Int64] {
        guard let text = ProcessResources.readFile("/proc/thread-self/net/snmp") else { return [:] }
        let lines = text.split(separator: "\n").filter { $0.hasPrefix("\(group): ") }
        guard lines.count >= 2 else { return [:] }
        let names = lines[0].split(separator: " ").dropFirst()
        let values = lines[1].split(separator: " ").dropFirst()
        var result: [String: Int64] = [:]
        for (name, value) in zip(names, values) { result[String(name)] = Int64(value) }
        return result
    }
}
