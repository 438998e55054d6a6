import Foundation
import Glibc
import Testing
import NetworkTestSupport
import Tap

/// Interface names are checked before any system call, so these run without privileges.
@Test("Names the kernel would refuse are rejected before any system call", arguments: [
    "", "a234567890123456", "a/b", "a:b", "a b", "a\tb", ".", "..",
])
func invalidNamesAreRejected(name: String) {
    #expect(throws: TapError.invalidName(name)) { try TapDevice.open(name: name) }
    #expect(throws: TapError.invalidName(name)) { try TapDevice.delete(name: name) }
}

@Test func aNameWithANulIsRejected() {
    // C would see only "tap"; refusing it keeps the name Swift holds and the kernel's the same.
    #expect(throws: TapError.invalidName("tap\u{0}x")) { try TapDevice.open(name: "tap\u{0}x") }
}

@Test func invalidNameDescriptionShowsTheName() {
    let error = TapError.invalidName("much-too-long-name")
    #expect(error.description.contains("much-too-long-name"))
    #expect(error.device == "much-too-long-name")
}

@Test func queueCountIsCheckedBeforeAnySystemCall() {
    #expect(throws: TapError.invalidQueueCount(device: "vtap0", 0)) { try TapDevice.open(name: "vtap0", queuePairs: 0) }
    #expect(throws: TapError.invalidQueueCount(device: "vtap0", 257)) { try TapDevice.open(name: "vtap0", queuePairs: 257) }
}

/// Everything else needs CAP_NET_ADMIN: each test makes its own network namespace, opens the TAP from
/// a thread inside it, and deletes the namespace when done, also on failure.
@Suite("TAP device in a test namespace", .enabled(if: getuid() == 0, "needs root for network namespaces and TAPs"))
struct TapNamespaceTests {
    /// `ip -d link show NAME`, or nil once the interface is gone.
    private func linkDetails(_ namespace: NetworkNamespace, _ name: String) -> String? {
        try? namespace.ip("-d", "link", "show", "dev", name)
    }

    /// Waits (polling `ip`, with a generous deadline) for an interface to disappear.
    private func waitUntilGone(_ namespace: NetworkNamespace, _ name: String) -> Bool {
        waitUntil { linkDetails(namespace, name) == nil }
    }

    /// Polls `condition` until it holds or ten seconds pass. Closing a descriptor does not always
    /// release the TAP at once: a child another test is spawning may hold a copy of the descriptor
    /// table until its exec closes the close-on-exec descriptors.
    private func waitUntil(_ condition: () -> Bool) -> Bool {
        let clock = ContinuousClock()
        let end = clock.now.advanced(by: .seconds(10))
        while clock.now < end {
            if condition() { return true }
        }
        return false
    }

    // MARK: Creating and attaching

    @Test func createsANewTap() async throws {
        try await NetworkNamespace.with { namespace in
            var tap: TapDevice? = try await namespace.run { try TapDevice.open(name: "vtap0") }
            do {
                let device = try #require(tap)
                #expect(device.name == "vtap0")
                #expect(device.createdByUs)
                #expect(device.queueCount == 1)
                #expect(!device.isMultiQueue)
                #expect(device.vnetHeaderSize == 12)
                #expect(fcntl(device.fd(queue: 0), F_GETFD) & FD_CLOEXEC != 0)
                #expect(fcntl(device.fd(queue: 0), F_GETFL) & O_NONBLOCK != 0)
            }
            let details = try #require(linkDetails(namespace, "vtap0"))
            #expect(details.contains("tun type tap"))
            #expect(details.contains("pi off"))
            #expect(details.contains("vnet_hdr on"))
            #expect(details.contains("persist off"))

            // Not persistent: closing the last descriptor removes it.
            tap = nil
            #expect(waitUntilGone(namespace, "vtap0"))
        }
    }

    @Test func createsAMultiQueueTapWithAFifteenByteName() async throws {
        try await NetworkNamespace.with { namespace in
            let name = "vtap-0123456789"  // IFNAMSIZ - 1 bytes: the longest name
            let tap = try await namespace.run { try TapDevice.open(name: name, queuePairs: 4) }
            #expect(tap.name == name)
            #expect(tap.createdByUs)
            #expect(tap.isMultiQueue)
            #expect(tap.queueCount == 4)
            #expect(Set((0..<4).map { tap.fd(queue: $0) }).count == 4)
            let details = try #require(linkDetails(namespace, name))
            #expect(details.contains("multi_queue numqueues 4"))

            // A second opener attaches more queues to the same TAP.
            let second = try await namespace.run { try TapDevice.open(name: name, queuePairs: 2) }
            #expect(!second.createdByUs)
            #expect(second.isMultiQueue)
            #expect(second.queueCount == 2)
            #expect(try #require(linkDetails(namespace, name)).contains("numqueues 6"))
        }
    }

    @Test func expandsANameTemplate() async throws {
        try await NetworkNamespace.with { namespace in
            let tap = try await namespace.run { try TapDevice.open(name: "vt%d") }
            #expect(tap.name == "vt0")
            #expect(tap.createdByUs)
            #expect(linkDetails(namespace, "vt0") != nil)
        }
    }

    @Test func attachesToAPersistentMultiQueueTap() async throws {
        try await NetworkNamespace.with { namespace in
            try namespace.ip("tuntap", "add", "dev", "ptap0", "mode", "tap", "multi_queue", "vnet_hdr")
            var tap: TapDevice? = try await namespace.run { try TapDevice.open(name: "ptap0", queuePairs: 2) }
            #expect(tap?.createdByUs == false)
            #expect(tap?.isMultiQueue == true)
            #expect(tap?.queueCount == 2)
            #expect(try #require(linkDetails(namespace, "ptap0")).contains("numqueues 2"))

            // One queue on a multi_queue TAP is fine too: the open retries with IFF_MULTI_QUEUE.
            var single: TapDevice? = try await namespace.run { try TapDevice.open(name: "ptap0", queuePairs: 1) }
            #expect(single?.isMultiQueue == true)
            #expect(single?.queueCount == 1)

            // Persistent: it outlives our descriptors...
            tap = nil
            single = nil
            #expect(waitUntil { linkDetails(namespace, "ptap0")?.contains("numqueues 0") == true })

            // ...until deleted.
            #expect(try await namespace.run { try TapDevice.delete(name: "ptap0") })
            #expect(waitUntilGone(namespace, "ptap0"))
            #expect(try await namespace.run { try TapDevice.delete(name: "ptap0") } == false)
        }
    }

    @Test func singleQueueTapRefusesSeveralQueuesAndASecondOpener() async throws {
        try await NetworkNamespace.with { namespace in
            try namespace.ip("tuntap", "add", "dev", "stap0", "mode", "tap", "vnet_hdr")
            try await namespace.run {
                #expect(throws: TapError.multiQueueNotSupported(device: "stap0", existingSingleQueue: true)) {
                    try TapDevice.open(name: "stap0", queuePairs: 2)
                }
                do {
                    // The refused open above attached a descriptor and closed it.
                    let tap = try TestNet.openRetryingWhileBusy(name: "stap0")
                    #expect(!tap.createdByUs)
                    #expect(!tap.isMultiQueue)
                    let error = #expect(throws: TapError.self) { try TapDevice.open(name: "stap0") }
                    guard case .busy(let device, _) = error else {
                        Issue.record("expected .busy, got \(String(describing: error))")
                        return
                    }
                    #expect(device == "stap0")
                    // delete() attaches too, so it is refused while `tap` holds the only queue.
                    #expect(throws: TapError.self) { try TapDevice.delete(name: "stap0") }
                }
                #expect(try TestNet.deleteRetryingWhileBusy(name: "stap0"))
            }
            #expect(waitUntilGone(namespace, "stap0"))
        }
    }

    @Test("A name that belongs to a non-TAP interface is an error naming the device",
          arguments: ["veth", "bridge", "tun"])
    func refusesANonTapInterface(kind: String) async throws {
        try await NetworkNamespace.with { namespace in
            let name = "vother0"
            switch kind {
            case "veth": try namespace.ip("link", "add", name, "type", "veth", "peer", "name", "vother1")
            case "bridge": try namespace.ip("link", "add", name, "type", "bridge")
            default: try namespace.ip("tuntap", "add", "dev", name, "mode", "tun")
            }
            for queuePairs in [1, 2] {
                let error = await #expect(throws: TapError.self) {
                    try await namespace.run { try TapDevice.open(name: name, queuePairs: queuePairs) }
                }
                guard case .nameInUseByNonTap(let device, let cause) = error else {
                    Issue.record("expected .nameInUseByNonTap, got \(String(describing: error))")
                    continue
                }
                #expect(device == name)
                #expect(cause.errno.rawValue == EINVAL)
                #expect(error?.description.contains(name) == true)
            }
            // The interface is untouched.
            #expect(linkDetails(namespace, name) != nil)
        }
    }

    // MARK: Settings

    @Test func probesAndSetsOffloads() async throws {
        try await NetworkNamespace.with { namespace in
            let tap = try await namespace.run { try TapDevice.open(name: "vtap0") }
            #expect(tap.offloads == [])
            let accepted = tap.probeOffloads()
            #expect(accepted.isSuperset(of: [.csum, .tso4, .tso6]), "accepted: \(accepted)")
            #expect(tap.offloads == [], "probing restores the setting")

            try tap.setOffloads([.csum, .tso4, .tso6])
            #expect(tap.offloads == [.csum, .tso4, .tso6])
            #expect(tap.probeOffloads() == accepted)
            #expect(tap.offloads == [.csum, .tso4, .tso6])

            try tap.setOffloads(accepted)
            #expect(tap.offloads == accepted)

            // The kernel wants csum under every other offload; a refused set leaves the old one.
            let error = #expect(throws: TapError.self) { try tap.setOffloads([.tso4]) }
            guard case .system(let device, let cause) = error else {
                Issue.record("expected .system, got \(String(describing: error))")
                return
            }
            #expect(device == "vtap0")
            #expect(cause.call == "ioctl(TUNSETOFFLOAD)")
            #expect(cause.errno.rawValue == EINVAL)
            #expect(tap.offloads == accepted)
            try tap.setOffloads([])
        }
    }

    @Test func setsTheMTU() async throws {
        try await NetworkNamespace.with { namespace in
            let tap = try await namespace.run { try TapDevice.open(name: "vtap0") }
            #expect(try tap.mtu() == 1500)
            try tap.setMTU(9000)
            #expect(try tap.mtu() == 9000)
            #expect(try namespace.ip("link", "show", "dev", "vtap0").contains("mtu 9000"))
            #expect(throws: TapError.self) { try tap.setMTU(Int(Int32.max) + 1) }
            #expect(throws: TapError.self) { try tap.setMTU(10) }  // below the minimum of 68
            #expect(try tap.mtu() == 9000)
        }
    }

    @Test func bringsTheLinkUpAndDown() async throws {
        try await NetworkNamespace.with { namespace in
            let tap = try await namespace.run { try TapDevice.open(name: "vtap0") }
            #expect(try !tap.isLinkUp())
            try tap.setLinkUp(true)
            #expect(try tap.isLinkUp())
            #expect(try namespace.ip("link", "show", "dev", "vtap0").contains(",UP"))
            try tap.setLinkUp(true)  // idempotent
            try tap.setLinkUp(false)
            #expect(try !tap.isLinkUp())
            #expect(try !namespace.ip("link", "show", "dev", "vtap0").contains(",UP"))
        }
    }

    // MARK: Frames

    @Test func aWrittenFrameReachesTheNamespace() async throws {
        try await NetworkNamespace.with { namespace in
            let tap = try await namespace.run { try TapDevice.open(name: "vtap0") }
            try TestNet.configure(namespace, tap: "vtap0")
            let payload = Array("hello from the guest side".utf8)
            let frame = TestNet.udpFrame(
                from: TestNet.peerMAC, to: TestNet.tapMAC, sourceIP: TestNet.peerIP, destinationIP: TestNet.tapIP,
                sourcePort: 40000, destinationPort: 5555, payload: payload)

            try await namespace.run {
                let packets = try TestSocket.packet(interface: "vtap0")
                let udp = try TestSocket.udp(bindTo: TestNet.tapIP, port: 5555)
                let written = try TestNet.write(tap, queue: 0, frame: frame)
                #expect(written == 12 + frame.count)

                // The packet socket sees the frame as it came in, without the vnet header...
                let seen = try packets.receive { $0 == frame }
                #expect(seen != nil)
                // ...and the IP stack delivers the datagram to the socket bound to 198.18.0.1.
                let datagram = try udp.receive { _ in true }
                #expect(datagram == payload)
            }
            // The kernel counts frames written into a TAP as received by the interface.
            let statistics = try namespace.ip("-s", "link", "show", "dev", "vtap0")
            #expect(statistics.contains("RX:"))
        }
    }

    @Test func aFrameFromTheNamespaceIsReadWithAVnetHeader() async throws {
        try await NetworkNamespace.with { namespace in
            let tap = try await namespace.run {
                TestNet.disableIPv6InCurrentNamespace()
                return try TapDevice.open(name: "vtap0")
            }
            try TestNet.configure(namespace, tap: "vtap0")
            let payload = Array("hello from the host side".utf8)
            try await namespace.run {
                let udp = try TestSocket.udp()
                try udp.send(payload, to: TestNet.peerIP, port: 6666)
            }
            let frames = try TestNet.readFrames(from: tap, queues: [0], wanted: 1) { $0.udpDestinationPort == 6666 }
            let frame = try #require(frames.first)
            // Offloads are off: no checksum or GSO request in the header. num_buffers (the last two
            // bytes) is not the TAP's to fill: Linux 6.18 zeroes it, older kernels skip it.
            #expect(Array(frame.header.prefix(10)) == [UInt8](repeating: 0, count: 10))
            let ethernet = Array(frame.ethernet)
            #expect(Array(ethernet[0..<6]) == TestNet.peerMAC)
            #expect(Array(ethernet[6..<12]) == TestNet.tapMAC)
            #expect(Array(ethernet.suffix(payload.count)) == payload)
            let headers = 12 + 14 + 20 + 8
            #expect(frame.bytes.count == headers + payload.count)
        }
    }

    @Test func checksumOffloadShowsInTheHeader() async throws {
        try await NetworkNamespace.with { namespace in
            let tap = try await namespace.run {
                TestNet.disableIPv6InCurrentNamespace()
                return try TapDevice.open(name: "vtap0")
            }
            try TestNet.configure(namespace, tap: "vtap0")
            try tap.setOffloads([.csum])
            try await namespace.run {
                try TestSocket.udp().send(Array("partial".utf8), to: TestNet.peerIP, port: 6667)
            }
            let frame = try #require(
                TestNet.readFrames(from: tap, queues: [0], wanted: 1) { $0.udpDestinationPort == 6667 }.first)
            #expect(frame.flags & 1 == 1, "VIRTIO_NET_HDR_F_NEEDS_CSUM")
            let csumStart = UInt16(frame.bytes[6]) | UInt16(frame.bytes[7]) << 8
            let csumOffset = UInt16(frame.bytes[8]) | UInt16(frame.bytes[9]) << 8
            #expect(csumStart == 14 + 20)  // the UDP header
            #expect(csumOffset == 6)  // UDP checksum field
        }
    }

    @Test func udpSegmentationOffloadDeliversOneGSOFrame() async throws {
        try await NetworkNamespace.with { namespace in
            let tap = try await namespace.run {
                TestNet.disableIPv6InCurrentNamespace()
                return try TapDevice.open(name: "vtap0")
            }
            try TestNet.configure(namespace, tap: "vtap0")
            let uso = tap.probeOffloads().isSuperset(of: [.csum, .uso4, .uso6])
            if uso { try tap.setOffloads([.csum, .uso4, .uso6]) }
            let payload = [UInt8](repeating: 0x5A, count: 3000)
            try await namespace.run {
                let udp = try TestSocket.udp()
                try udp.setOption(level: 17, name: 103, value: 1000)  // SOL_UDP, UDP_SEGMENT
                try udp.send(payload, to: TestNet.peerIP, port: 6668)
            }
            let frames = try TestNet.readFrames(from: tap, queues: [0], wanted: uso ? 1 : 3) {
                $0.udpDestinationPort == 6668
            }
            if uso {
                let frame = try #require(frames.first)
                #expect(frame.gsoType == 5, "VIRTIO_NET_HDR_GSO_UDP_L4")
                #expect(frame.gsoSize == 1000)
                let headers = 12 + 14 + 20 + 8
                #expect(frame.bytes.count == headers + payload.count)
            } else {
                #expect(frames.count == 3)
            }
        }
    }

    @Test func multiQueueReadsAndWrites() async throws {
        try await NetworkNamespace.with { namespace in
            let tap = try await namespace.run {
                TestNet.disableIPv6InCurrentNamespace()
                return try TapDevice.open(name: "vmq0", queuePairs: 2)
            }
            try TestNet.configure(namespace, tap: "vmq0")

            // Guest -> namespace on both queues: every frame arrives.
            let frames = (0..<8).map { index in
                TestNet.udpFrame(
                    from: TestNet.peerMAC, to: TestNet.tapMAC, sourceIP: TestNet.peerIP, destinationIP: TestNet.tapIP,
                    sourcePort: UInt16(41000 + index), destinationPort: 5556, payload: [UInt8(index)])
            }
            let received = try await namespace.run { () -> [UInt8] in
                let udp = try TestSocket.udp(bindTo: TestNet.tapIP, port: 5556)
                for (index, frame) in frames.enumerated() {
                    #expect(try TestNet.write(tap, queue: index % 2, frame: frame) == 12 + frame.count)
                }
                var payloads: [UInt8] = []
                while payloads.count < frames.count, let datagram = try udp.receive(matching: { _ in true }) {
                    payloads += datagram
                }
                return payloads
            }
            #expect(received.sorted() == Array(0..<8))

            // Namespace -> guest: flows are spread over the queues; together they carry every datagram.
            let ports = (0..<16).map { UInt16(42000 + $0) }
            try await namespace.run {
                for port in ports {
                    let udp = try TestSocket.udp(bindTo: TestNet.tapIP, port: port)
                    try udp.send([1], to: TestNet.peerIP, port: 6669)
                }
            }
            let read = try TestNet.readFrames(from: tap, queues: [0, 1], wanted: ports.count) {
                $0.udpDestinationPort == 6669
            }
            #expect(read.compactMap(\.udpSourcePort).sorted() == ports)

            // With queue 1 detached, everything comes through queue 0.
            try tap.setQueueEnabled(1, false)
            #expect(!tap.isQueueEnabled(1))
            try tap.setQueueEnabled(1, false)  // no-op
            try await namespace.run {
                for port in ports.prefix(8) {
                    try TestSocket.udp(bindTo: TestNet.tapIP, port: port).send([2], to: TestNet.peerIP, port: 6670)
                }
            }
            let detached = try TestNet.readFrames(from: tap, queues: [0, 1], wanted: 8) { $0.udpDestinationPort == 6670 }
            #expect(detached.count == 8)
            #expect(detached.allSatisfy { $0.queue == 0 })

            try tap.setQueueEnabled(1, true)
            #expect(tap.isQueueEnabled(1))

            // Offloads are a device setting, set through queue 0's descriptor, which works detached too.
            try tap.setQueueEnabled(0, false)
            try tap.setOffloads([.csum])
            #expect(tap.probeOffloads().contains(.csum))
            try tap.setQueueEnabled(0, true)

            // Queue indices are checked.
            var byte: UInt8 = 0
            withUnsafeMutablePointer(to: &byte) { pointer in
                var vector = iovec(iov_base: pointer, iov_len: 1)
                withUnsafePointer(to: &vector) { vectors in
                    let buffer = UnsafeBufferPointer(start: vectors, count: 1)
                    #expect(throws: TapError.invalidQueue(device: "vmq0", queue: 2)) { try tap.read(queue: 2, into: buffer) }
                    #expect(throws: TapError.invalidQueue(device: "vmq0", queue: -1)) { try tap.write(queue: -1, iovecs: buffer) }
                }
            }
            #expect(throws: TapError.invalidQueue(device: "vmq0", queue: 5)) { try tap.setQueueEnabled(5, false) }
        }
    }

    /// Kernel behaviour the data path relies on: reads truncate silently, write errors are per frame.
    @Test func truncatedReadsAndWriteErrors() async throws {
        try await NetworkNamespace.with { namespace in
            let tap = try await namespace.run {
                TestNet.disableIPv6InCurrentNamespace()
                return try TapDevice.open(name: "vtap0")
            }
            let frame = TestNet.udpFrame(
                from: TestNet.peerMAC, to: TestNet.tapMAC, sourceIP: TestNet.peerIP, destinationIP: TestNet.tapIP,
                sourcePort: 1, destinationPort: 9, payload: [1, 2, 3])
            func errno(of body: () throws -> Int?) -> Int32? {
                do {
                    _ = try body()
                    return nil
                } catch {
                    guard case .system(_, let cause) = error as? TapError else { return nil }
                    return cause.errno.rawValue
                }
            }
            // Down: EIO.
            #expect(errno { try TestNet.write(tap, queue: 0, frame: frame) } == EIO)
            try TestNet.configure(namespace, tap: "vtap0")

            // A 1000-byte datagram read into 100 bytes: the read fills them and the rest is gone.
            try await namespace.run {
                try TestSocket.udp().send([UInt8](repeating: 7, count: 1000), to: TestNet.peerIP, port: 7000)
            }
            #expect(try Poll.waitReadable([tap.fd(queue: 0)], timeout: .seconds(10)) == [true])
            var small = [UInt8](repeating: 0, count: 100)
            let count = try small.withUnsafeMutableBytes { raw in
                var vector = iovec(iov_base: raw.baseAddress, iov_len: raw.count)
                return try withUnsafePointer(to: &vector) {
                    try tap.read(queue: 0, into: UnsafeBufferPointer(start: $0, count: 1))
                }
            }
            #expect(count == 100)
            #expect(TestNet.ReadFrame(queue: 0, bytes: small).udpDestinationPort == 7000)
            let rest = try TestNet.readFrames(from: tap, queues: [0], wanted: 1, deadline: .milliseconds(200)) {
                $0.udpDestinationPort == 7000
            }
            #expect(rest.isEmpty)

            // Up: accepted.
            #expect(try TestNet.write(tap, queue: 0, frame: frame) == 12 + frame.count)
            // Shorter than an Ethernet header: EINVAL.
            #expect(errno { try TestNet.write(tap, queue: 0, frame: [0, 1, 2]) } == EINVAL)
            // A checksum request starting beyond the frame: EINVAL.
            var header = TestNet.zeroVnetHeader
            header[0] = 1  // VIRTIO_NET_HDR_F_NEEDS_CSUM
            header[6] = 0xff
            header[7] = 0x7f  // csum_start 0x7fff
            #expect(errno { try TestNet.write(tap, queue: 0, header: header, frame: frame) } == EINVAL)
        }
    }

    @Test func readingAnEmptyQueueReturnsNil() async throws {
        try await NetworkNamespace.with { namespace in
            let tap = try await namespace.run { try TapDevice.open(name: "vtap0") }
            var buffer = [UInt8](repeating: 0, count: 2048)
            let result = try buffer.withUnsafeMutableBytes { raw in
                var vector = iovec(iov_base: raw.baseAddress, iov_len: raw.count)
                return try withUnsafePointer(to: &vector) {
                    try tap.read(queue: 0, into: UnsafeBufferPointer(start: $0, count: 1))
                }
            }
            #expect(result == nil)
        }
    }
}
