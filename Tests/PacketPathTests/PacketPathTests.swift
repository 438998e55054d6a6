import Foundation
import Glibc
import NetworkTestSupport
import Tap
import Testing
import VirtioNet
import VirtioNetTestSupport

/// Real frames through the device: a simulated guest drives `NetDevice` (worker threads) in front of a
/// TAP in namespace A, bridged to a veth pair whose far end, in namespace B, is the peer (see
/// ``PacketPathFixture``). Every namespace is the test's own and deleted afterwards.
///
/// Needs root (CAP_NET_ADMIN for namespaces, TAPs, bridges, veth pairs); as non-root the suite is
/// skipped and says so. Serialized: the tests find the device's worker by its thread name and count
/// the process's descriptors, and the machine has two cores.
@Suite("Packet path through TAP, bridge and veth", .serialized,
       .enabled(if: getuid() == 0, "needs root: network namespaces, TAP, bridge and veth devices"))
struct PacketPathTests {
    // MARK: 1. ARP and ICMP

    /// Also with a legacy driver (no VERSION_1, no mergeable buffers): the TAP's vnet header is then
    /// 10 bytes, as the guest's.
    @Test("The guest resolves the peer with ARP and pings it; requests and replies cross TAP, bridge and veth",
          arguments: [false, true])
    func arpAndICMPEcho(legacy: Bool) async throws {
        let wanted = legacy ? VirtioNetFeatures(rawValue: ~0).subtracting([.version1, .mergeableRxBuffers]) : nil
        try await PacketPathFixture.with(wanted: wanted) { f in
            #expect(f.driver.headerSize == (legacy ? 10 : 12))
            #expect(f.tap.vnetHeaderSize == (legacy ? 10 : 12))
            let capture = try await f.peerCapture()
            f.driver.postReceiveBuffers(count: 128)

            let request = Packet.arpRequestFrame(senderMAC: Guest.macBytes, senderIP: Guest.ipv4, targetIP: Peer.ipv4)
            #expect(f.driver.send(request))
            // B sees the request as the guest wrote it...
            let seen = try capture.receive { $0.starts(with: request) }
            #expect(seen != nil, "the ARP request never reached veth-b")
            // ...and its answer lands in the guest's receive ring.
            let (_, arpFrame) = try #require(f.driver.firstFrame { $0.arp?.operation == 2 }, "no ARP reply reached the guest")
            let reply = try #require(arpFrame.arp)
            #expect(arpFrame.destinationMAC == Guest.macBytes)
            #expect(reply.senderMAC == Peer.mac)
            #expect(reply.senderIP == Peer.ipv4)
            #expect(reply.targetMAC == Guest.macBytes)
            #expect(reply.targetIP == Guest.ipv4)

            // An echo request to the MAC the reply told, and B's echo reply.
            let payload = Packet.pattern(count: 56, seed: 1)
            let echo = Packet.icmpEchoFrame(
                sourceMAC: Guest.macBytes, destinationMAC: reply.senderMAC, source: Guest.ipv4, destination: Peer.ipv4,
                identifier: 0x5150, sequence: 7, payload: payload)
            #expect(f.driver.send(echo))
            let (_, answer) = try #require(
                f.driver.firstFrame { $0.icmpEcho?.isReply == true && $0.icmpEcho?.identifier == 0x5150 },
                "no echo reply reached the guest")
            let icmp = try #require(answer.icmpEcho)
            #expect(icmp.sequence == 7)
            #expect(icmp.payload == payload)
            #expect(icmp.checksumValid)
            #expect(answer.ipv4HeaderChecksumValid == true)
            #expect(answer.addresses == .v4(source: Peer.ipv4, destination: Guest.ipv4))
            #expect(answer.sourceMAC == Peer.mac)
            #expect(answer.destinationMAC == Guest.macBytes)

            let counters = f.device.queuePairCounters[0]
            #expect(f.settled(counters.transmit.frames, at: 2) == 2)
            #expect(counters.transmit.totalDrops == 0)
            #expect(f.settled(counters.receive.frames, at: 2) >= 2)
        }
    }

    // MARK: 2. Checksum offload, guest to host

    @Test("A UDP datagram with NEEDS_CSUM and only the pseudo-header sum is completed by the kernel; a wrong full checksum is dropped")
    func checksumOffloadFromTheGuest() async throws {
        try await PacketPathFixture.with { f in
            #expect(f.driver.features.contains(.csum))
            let port: UInt16 = 7002
            let udp = try await f.peerUDP(port: port)
            let capture = try await f.peerCapture()
            let addresses = IPVersion.v4.outbound
            func frame(_ payload: [UInt8], _ checksum: TransportChecksum) -> [UInt8] {
                Packet.udpFrame(sourceMAC: Guest.macBytes, destinationMAC: Peer.mac, addresses,
                                sourcePort: 40002, destinationPort: port, payload: payload, checksum: checksum)
            }

            // Partial: csum_start at the UDP header, csum_offset 6, the field holding the pseudo-header sum.
            let payload = Array("the kernel completes this checksum".utf8)
            let partial = frame(payload, .pseudoHeader)
            let header = VirtioNetHeader(flags: .needsCsum, csumStart: 14 + 20, csumOffset: 6)
            #expect(f.driver.send(partial, header: header))
            #expect(try udp.receive { _ in true } == payload)
            // On veth-b the datagram carries the complete, correct checksum.
            let wire = try #require(try capture.receive { ParsedFrame($0)?.udp?.destinationPort == port }.flatMap(ParsedFrame.init))
            #expect(wire.transportChecksumValid == true)
            #expect(wire.udp?.checksum != ParsedFrame(partial)?.udp?.checksum)
            #expect(wire.udp?.payload == payload)

            // Wrong full checksum and no NEEDS_CSUM: B's UDP drops it. A good datagram sent after it
            // is the next one the socket returns, and B counts one checksum error.
            let errorsBefore = try await f.network.peer.run { SNMP.counters("Udp")["InCsumErrors"] ?? -1 }
            let correct = try #require(ParsedFrame(frame(Array("wrong checksum".utf8), .full))?.udp?.checksum)
            let wrong = correct == 0x5a5a ? 0x1234 : correct ^ 0x5a5a
            #expect(f.driver.send(frame(Array("wrong checksum".utf8), .value(wrong))))
            let after = Array("sent after the wrong one".utf8)
            #expect(f.driver.send(frame(after, .full)))
            #expect(try udp.receive { _ in true } == after)
            let errorsAfter = try await f.network.peer.run { SNMP.counters("Udp")["InCsumErrors"] ?? -1 }
            #expect(errorsAfter == errorsBefore + 1)

            let counters = f.device.queuePairCounters[0].transmit
            #expect(f.settled(counters.frames, at: 3) == 3)
            #expect(counters.totalDrops == 0)
        }
    }

    // MARK: 3. TSO, guest to host

    @Test("A 60 KiB TCP segment with GSO leaves veth-b as MSS-sized segments with correct checksums",
          arguments: [IPVersion.v4, .v6])
    func tcpSegmentationOffload(version: IPVersion) async throws {
        try await PacketPathFixture.with { f in
            #expect(f.driver.features.isSuperset(of: [.csum, .hostTSO4, .hostTSO6]))
            let capture = try await f.peerCapture()
            let addresses = version.outbound
            let ipHeader = addresses.headerLength
            // The largest segments a 1500-byte MTU carries: 1448 bytes (IPv4, room for timestamps),
            // 1440 (IPv6: 40-byte header).
            let mss = version == .v4 ? 1448 : 1440
            let payload = Packet.pattern(count: 60 * 1024, seed: version == .v4 ? 3 : 6)
            let sequence: UInt32 = 0x1000_0000
            let (sourcePort, destinationPort): (UInt16, UInt16) = (40003, 9)
            let frame = Packet.tcpFrame(
                sourceMAC: Guest.macBytes, destinationMAC: Peer.mac, addresses, sourcePort: sourcePort,
                destinationPort: destinationPort, sequence: sequence, payload: payload, checksum: .pseudoHeader)
            let header = VirtioNetHeader(
                flags: .needsCsum, gsoType: version == .v4 ? .tcpv4 : .tcpv6, headerLength: UInt16(14 + ipHeader + 20),
                gsoSize: UInt16(mss), csumStart: UInt16(14 + ipHeader), csumOffset: 16)
            #expect(f.driver.send(frame, header: header))

            var segments: [ParsedFrame] = []
            var received = 0
            try capture.receiveAll(deadline: .seconds(15)) { bytes, type in
                guard type != .outgoing, let parsed = ParsedFrame(bytes), parsed.addresses == addresses,
                      let tcp = parsed.tcp, tcp.sourcePort == sourcePort, tcp.destinationPort == destinationPort else { return false }
                segments.append(parsed)
                received += tcp.payload.count
                return received >= payload.count
            }
            let expected = (payload.count + mss - 1) / mss
            #expect(segments.count == expected, "\(segments.count) segments, \(received) bytes")
            for (index, segment) in segments.enumerated() {
                let tcp = try #require(segment.tcp)
                #expect(tcp.payload.count <= mss, "segment \(index)")
                #expect(segment.bytes.count <= 14 + 1500, "segment \(index)")
                #expect(segment.transportChecksumValid == true, "TCP checksum of segment \(index)")
                if version == .v4 { #expect(segment.ipv4HeaderChecksumValid == true, "IP checksum of segment \(index)") }
                #expect(segment.ipEnd == segment.transportOffset.map { $0 + tcp.headerLength + tcp.payload.count })
            }
            // The segments' payloads, put back in sequence order, are the original bytes.
            let ordered = segments.compactMap(\.tcp).sorted { $0.sequence &- sequence < $1.sequence &- sequence }
            var reassembled: [UInt8] = []
            for tcp in ordered {
                #expect(tcp.sequence &- sequence == UInt32(reassembled.count), "gap or overlap in sequence space")
                reassembled += tcp.payload
            }
            #expect(reassembled == payload)

            let counters = f.device.queuePairCounters[0].transmit
            #expect(f.settled(counters.frames, at: 1) == 1)
            #expect(counters.totalDrops == 0)
        }
    }

    // MARK: 4. Checksum offload, host to guest

    @Test("With GUEST_CSUM a datagram from B arrives with DATA_VALID or NEEDS_CSUM and a consistent header")
    func checksumOffloadToTheGuest() async throws {
        try await PacketPathFixture.with { f in
            #expect(f.driver.features.contains(.guestCsum))
            f.driver.postReceiveBuffers(count: 128)
            let payload = Array("checksum left to the guest".utf8)
            let port: UInt16 = 7004
            try await f.network.peer.run {
                try TestSocket.udp(bindTo: Peer.ipv4, port: 7104).send(payload, to: Guest.ipv4, port: port)
            }
            let (received, parsed) = try #require(f.driver.firstFrame { $0.udp?.destinationPort == port })
            let header = received.header
            #expect(parsed.udp?.payload == payload)
            #expect(parsed.addresses == .v4(source: Peer.ipv4, destination: Guest.ipv4))
            #expect(header.gsoType == VirtioNetHeader.GSOType.none)
            #expect(!header.flags.isDisjoint(with: [.needsCsum, .dataValid]), "flags \(header.flags.rawValue)")
            if header.flags.contains(.needsCsum) {
                // csum_start/csum_offset name the UDP checksum inside the frame, and completing the
                // sum from there gives a datagram whose checksum is right.
                #expect(Int(header.csumStart) == parsed.transportOffset)
                #expect(header.csumOffset == 6)
                let completed = try #require(Checksum.complete(received.frame, start: Int(header.csumStart), offset: Int(header.csumOffset)))
                #expect(ParsedFrame(completed)?.transportChecksumValid == true)
            } else {
                #expect(parsed.transportChecksumValid == true)
            }
            #expect(f.device.queuePairCounters[0].receive.totalDrops == 0)
        }
    }

    // MARK: 5. Multiqueue

    @Test("Two queue pairs: frames from both TX queues reach B, and flows from B spread over both RX queues")
    func multiqueue() async throws {
        try await PacketPathFixture.with(queuePairs: 2) { f in
            #expect(f.driver.features.contains(.mq))
            #expect(f.driver.queuePairs == 2)
            // VIRTIO_NET_CTRL_MQ (4), VQ_PAIRS_SET (0), le16 2.
            #expect(f.driver.control(class: 4, command: 0, data: [2, 0]) == ControlAck.ok.rawValue)
            #expect(f.device.activeQueuePairs == 2)
            #expect(f.tap.isQueueEnabled(0) && f.tap.isQueueEnabled(1))
            for pair in 0..<2 { f.driver.postReceiveBuffers(pair: pair, count: 128) }

            // Guest -> B on both transmit queues.
            let sink = try await f.peerUDP(port: 7005)
            var sent: Set<[UInt8]> = []
            for index in 0..<16 {
                let pair = index % 2
                let payload = Array("pair \(pair) frame \(index)".utf8)
                sent.insert(payload)
                let frame = Packet.udpFrame(sourceMAC: Guest.macBytes, destinationMAC: Peer.mac, IPVersion.v4.outbound,
                                            sourcePort: UInt16(41000 + index), destinationPort: 7005, payload: payload)
                #expect(f.driver.send(frame, pair: pair))
            }
            var arrived: Set<[UInt8]> = []
            try sink.receiveAll { datagram, _ in
                arrived.insert(datagram)
                return arrived.count == sent.count
            }
            #expect(arrived == sent)
            #expect(f.settled(f.device.queuePairCounters[0].transmit.frames, at: 8) == 8)
            #expect(f.settled(f.device.queuePairCounters[1].transmit.frames, at: 8) == 8)

            // B -> guest: 32 flows (source ports); the TAP hashes flows onto its queues.
            let ports = (0..<32).map { UInt16(43000 + $0) }
            try await f.network.peer.run {
                for port in ports {
                    try TestSocket.udp(bindTo: Peer.ipv4, port: port).send(Array("flow \(port)".utf8), to: Guest.ipv4, port: 7006)
                }
            }
            var seen: [UInt16: Int] = [:]
            _ = f.driver.collect(pairs: [0, 1]) { frames in
                seen = [:]
                for (pair, received) in frames {
                    if let udp = ParsedFrame(received.frame)?.udp, udp.destinationPort == 7006 { seen[udp.sourcePort] = pair }
                }
                return seen.count == ports.count
            }
            #expect(seen.keys.sorted() == ports)
            let perQueue = (0..<2).map { pair in seen.values.filter { $0 == pair }.count }
            #expect(perQueue.allSatisfy { $0 >= 1 }, "flows per receive queue: \(perQueue)")
            for pair in 0..<2 {
                let wanted = UInt64(perQueue[pair])
                #expect(f.settled(f.device.queuePairCounters[pair].receive.frames, at: wanted) >= wanted)
            }
        }
    }

    // MARK: 5b. Bursts

    @Test("Frames made available together go to the TAP as one burst and all reach B, whole and in order")
    func aBurstOfFramesArrivesWholeAndInOrder() async throws {
        try await PacketPathFixture.with { f in
            let sink = try await f.peerUDP(port: 7008)
            // 48 frames, one burst: whole frames in one descriptor (one plain write each) and frames
            // split over several (one writev each), of different lengths, mixed.
            let payloads = (0..<48).map { index in Array("burst frame \(index) ".utf8) + Packet.pattern(count: 13 * index, seed: UInt8(index)) }
            let burst = payloads.enumerated().map { index, payload in
                (frame: Packet.udpFrame(sourceMAC: Guest.macBytes, destinationMAC: Peer.mac, IPVersion.v4.outbound,
                                        sourcePort: 41100, destinationPort: 7008, payload: payload),
                 segmentSize: [nil, 64, nil, 300][index % 4])
            }
            #expect(f.driver.transmitBurst(burst))
            var arrived: [[UInt8]] = []
            try sink.receiveAll { datagram, _ in
                arrived.append(datagram)
                return arrived.count == payloads.count
            }
            // Compared without printing 48 payloads when they differ.
            let firstDifference = Array(zip(arrived, payloads)).firstIndex { $0.0 != $0.1 }
            #expect(arrived.count == payloads.count && firstDifference == nil,
                    "\(arrived.count) of \(payloads.count) datagrams arrived; first that differs: \(String(describing: firstDifference))")
            let counters = f.device.queuePairCounters[0].transmit
            #expect(f.settled(counters.frames, at: 48) == 48)
            #expect(counters.totalDrops == 0)
            var completed = 0
            #expect(f.driver.waitUntil { completed += f.driver.completedTransmits().count; return completed == 48 })
        }
    }

    // MARK: 6. MTU

    @Test("With MTU 1500 a larger frame without GSO is dropped and counted by the device, never reaching B")
    func framesAboveTheMTUAreDropped() async throws {
        try await PacketPathFixture.with(mtu: 1500) { f in
            let sink = try await f.peerUDP(port: 7007)
            let tapBefore = try f.tapStatistics()
            func frame(_ payload: [UInt8]) -> [UInt8] {
                Packet.udpFrame(sourceMAC: Guest.macBytes, destinationMAC: Peer.mac, IPVersion.v4.outbound,
                                sourcePort: 40007, destinationPort: 7007, payload: payload)
            }
            let oversize = frame(Packet.pattern(count: 1600))  // 1642 bytes: more than 1500 + 14 + 4
            let fits = frame(Array("fits the MTU".utf8))
            #expect(f.driver.send(oversize))
            #expect(f.driver.send(fits))
            // Sent second, it is the first to arrive: the oversize one went nowhere.
            #expect(try sink.receive { _ in true } == Array("fits the MTU".utf8))
            let counters = f.device.queuePairCounters[0].transmit
            #expect(counters.dropped(.oversize) == 1)
            #expect(f.settled(counters.frames, at: 1) == 1)
            #expect(f.driver.waitUntil { f.driver.transmitQueues[0].usedIndex == 2 }, "both chains returned to the guest")
            // The kernel saw one frame written into the TAP, not two.
            #expect(try f.tapStatistics().rxPackets - tapBefore.rxPackets == 1)
        }
    }

    @Test("With MTU 9000 a 9000-byte ICMP echo crosses unfragmented and its reply comes back")
    func jumboFramesWithMTU9000() async throws {
        try await PacketPathFixture.with(mtu: 9000) { f in
            #expect(try f.tap.mtu() == 9000)
            #expect(f.device.configSpace.mtu == 9000)
            #expect(try Link.details(f.network.peer, f.network.peerInterface).mtu == 9000)
            f.driver.postReceiveBuffers(count: 128)
            let payload = Packet.pattern(count: 9000 - 20 - 8, seed: 9)
            let echo = Packet.icmpEchoFrame(
                sourceMAC: Guest.macBytes, destinationMAC: Peer.mac, source: Guest.ipv4, destination: Peer.ipv4,
                identifier: 0x9000, sequence: 1, payload: payload)
            #expect(echo.count == 14 + 9000)
            #expect(f.driver.send(echo))
            let (received, reply) = try #require(
                f.driver.firstFrame { $0.icmpEcho?.isReply == true && $0.icmpEcho?.identifier == 0x9000 },
                "no echo reply to the 9000-byte request")
            #expect(reply.ipLength == 9000)
            #expect(received.frame.count == 14 + 9000)
            #expect(reply.icmpEcho?.payload == payload)
            #expect(reply.icmpEcho?.checksumValid == true)
            #expect(f.device.queuePairCounters[0].transmit.dropped(.oversize) == 0)
            #expect(received.buffers > 1, "a 9014-byte frame spans several 2 KiB mergeable buffers")
        }
    }

    // MARK: 7. Back-pressure

    @Test("Without receive buffers the worker sleeps while B floods it, and delivery resumes once buffers come")
    func noReceiveBuffersNoSpinning() async throws {
        try await PacketPathFixture.with { f in
            let worker = try #require(f.workerThread(pair: 0), "no thread vnet-qp0 waiting on this device's epoll")
            let flooder = try await f.network.peer.run { try TestSocket.udp(bindTo: Peer.ipv4, port: 7108) }
            let cpuBefore = try #require(ProcessResources.cpuTime(thread: worker))
            let tapBefore = try f.tapStatistics()

            // About a second of UDP at the guest, bounded in iterations too.
            let payload = Packet.pattern(count: 64)
            let (sent, senderCPU) = try await f.network.peer.run { () -> (Int, Duration) in
                let clock = ContinuousClock()
                let end = clock.now.advanced(by: .seconds(1))
                let start = ProcessResources.cpuTimeOfCurrentThread() ?? .zero
                var sent = 0
                var iterations = 0
                while clock.now < end && iterations < 5_000_000 {
                    if flooder.trySend(payload, to: Guest.ipv4, port: 7008) { sent += 1 }
                    iterations += 1
                }
                return (sent, (ProcessResources.cpuTimeOfCurrentThread() ?? .zero) - start)
            }
            let cpuAfter = try #require(ProcessResources.cpuTime(thread: worker))
            let spent = cpuAfter - cpuBefore
            // Far more than the TAP queues (its txqueuelen, 1000), so the kernel must drop some.
            #expect(sent > 5000, "B sent only \(sent) datagrams")
            // A control for the measurement: the sending thread, busy for the same second, shows it.
            #expect(senderCPU > .milliseconds(100), "the sender's own CPU time: \(senderCPU)")
            #expect(spent < .milliseconds(50), "vnet-qp0 used \(spent) of CPU while the guest had no buffers (\(sent) datagrams sent)")
            #expect(f.device.queuePairCounters[0].receive.frames.current == 0)
            // The frames waited in the TAP until its queue was full; the kernel dropped the rest.
            let tapAfter = try f.tapStatistics()
            #expect(tapAfter.txDropped > tapBefore.txDropped, "the TAP never overflowed: \(tapBefore) -> \(tapAfter)")

            // Buffers: the queued frames arrive, and so does one sent afterwards.
            f.driver.postReceiveBuffers(count: 200)
            let queued = f.driver.firstFrame { $0.udp?.destinationPort == 7008 }
            #expect(queued != nil, "no queued frame arrived after buffers were posted")
            try await f.network.peer.run {
                try TestSocket.udp(bindTo: Peer.ipv4, port: 7109).send(Array("after the flood".utf8), to: Guest.ipv4, port: 7009)
            }
            let fresh = f.driver.firstFrame { $0.udp?.destinationPort == 7009 }
            #expect(fresh?.1.udp?.payload == Array("after the flood".utf8))
            #expect(f.device.queuePairCounters[0].receive.kicks.current >= 1)
        }
    }

    // MARK: 8. Reset in the middle of traffic

    @Test("reset() in the middle of two-way traffic stops cleanly; every descriptor and thread of the device goes away")
    func resetDuringTraffic() async throws {
        try await BridgedPeer.with(PacketPathFixture.networkConfiguration()) { network in
            let tapName = PacketPathFixture.uniqueTapName()
            // Made before the baseline: these belong to the test, not to the device.
            let sink = try await network.peer.run { try TestSocket.udp(bindTo: Peer.ipv4, port: 7010) }
            let flooder = try await network.peer.run { try TestSocket.udp(bindTo: Peer.ipv4, port: 7110) }
            let namespaceA = try #require(ProcessResources.inode(of: network.bridgeSide.path))
            let fdCountBefore = ProcessResources.descriptorCount
            let threadCountBefore = ProcessResources.threadCount
            let descriptorsBefore = ProcessResources.descriptors()

            var tap: TapDevice? = try await PacketPathFixture.openTap(in: network, name: tapName, queuePairs: 2)
            var device: NetDevice? = try NetDevice(
                configuration: NetConfiguration(mac: Guest.mac, mtu: 1500, queuePairs: 2), backend: TapBackend(tap: tap!))
            defer { _ = device?.reset() }  // if the test ends early; a no-op once released
            var driver: SimulatedNetDriver? = try SimulatedNetDriver(device: device!, threaded: true)
            #expect(driver?.control(class: 4, command: 0, data: [2, 0]) == ControlAck.ok.rawValue)
            for pair in 0..<2 { driver?.postReceiveBuffers(pair: pair, count: 128) }

            // What the device stack holds, found while it idles: the TAP's queues and control socket
            // (a socket in namespace A), the driver's eventfds and memfd, each worker's epoll (which
            // watches a TAP queue) and what that epoll watches (its stop eventfd), and the workers.
            let tapFDs = (0..<2).map { tap!.fd(queue: $0) }
            let workers = (0..<2).compactMap { ProcessResources.workerThread(named: "vnet-qp\($0)", watching: tapFDs[$0]) }
            #expect(workers.count == 2, "worker threads vnet-qp0 and vnet-qp1 found: \(workers)")
            let opened = ProcessResources.opened(since: descriptorsBefore, now: ProcessResources.descriptors())
            let epolls = opened.filter { $0.value.isEpoll && !Set($0.value.watches).isDisjoint(with: tapFDs) }
            var mine = Set(tapFDs + epolls.values.flatMap(\.watches) + Array(epolls.keys))
            mine.formUnion(driver!.kicks.values.map(\.rawValue) + driver!.calls.values.map(\.rawValue) + driver!.guest.fds)
            mine.formUnion(opened.filter { $0.value.isSocket && ProcessResources.networkNamespaceInode(ofSocket: $0.key) == namespaceA }.keys)
            let tracked = opened.filter { mine.contains($0.key) }
            #expect(epolls.count == 2)
            #expect(tracked.values.filter(\.isSocket).count == 1, "the TAP's control socket")
            #expect(tracked.count == mine.count, "every descriptor of the stack was opened after the baseline")

            // Traffic both ways: B floods the guest in the background, the guest sends to B.
            let stop = StopFlag()
            let flood = Task {
                try await network.peer.run { () -> Int in
                    var sent = 0
                    var iterations = 0
                    while !stop.isSet && iterations < 20_000_000 {
                        if flooder.trySend(Packet.pattern(count: 200), to: Guest.ipv4, port: 7011) {
                            sent += 1
                            stop.advance()
                        }
                        iterations += 1
                    }
                    return sent
                }
            }
            defer { stop.set() }
            func guestFrame(_ index: Int) -> [UInt8] {
                Packet.udpFrame(sourceMAC: Guest.macBytes, destinationMAC: Peer.mac, IPVersion.v4.outbound,
                                sourcePort: UInt16(42000 + index % 64), destinationPort: 7010, payload: Packet.pattern(count: 300, seed: UInt8(index & 0xff)))
            }
            for index in 0..<64 { #expect(driver!.send(guestFrame(index), pair: index % 2)) }
            #expect(try sink.receive { _ in true } != nil, "nothing from the guest reached B")
            let flowing = driver!.collect(pairs: [0, 1]) { !$0.isEmpty }
            #expect(!flowing.isEmpty, "nothing from B reached the guest")

            // The flood is under way (a loaded machine may start its thread late).
            #expect(Wait.until(timeout: .seconds(20)) { stop.done > 0 }, "B's flood never started")

            // More frames in flight in both rings, then reset while the workers are busy.
            for index in 0..<200 { _ = driver!.transmit(guestFrame(index), pair: index % 2) }
            for pair in 0..<2 { driver!.postReceiveBuffers(pair: pair, count: 64) }
            let states = device!.reset()
            stop.set()
            let flooded = try await flood.value
            #expect(flooded > 0)
            #expect(device?.isActive == false)
            #expect(states.map(\.index) == [0, 1, 2, 3, 4])
            for pair in 0..<2 {
                // Where each queue stopped lies within what the guest made available.
                let rx = try #require(states.first { $0.index == 2 * pair })
                let tx = try #require(states.first { $0.index == 2 * pair + 1 })
                #expect(rx.nextAvailableIndex <= driver!.receiveQueues[pair].availableIndex)
                #expect(tx.nextAvailableIndex <= driver!.transmitQueues[pair].availableIndex)
            }

            driver = nil
            device = nil
            tap = nil

            // Closing is not instant everywhere: wait for it, then compare.
            var left: [Int32: ProcessResources.OpenFile] = [:]
            var running: [Int32] = []
            let settled = Wait.until(timeout: .seconds(20)) {
                left = ProcessResources.stillOpen(tracked)
                running = workers.filter(ProcessResources.threadExists)
                return left.isEmpty && running.isEmpty
            }
            // The process-wide totals, for the message: other suites running in parallel move them, so
            // the check is on the descriptors and threads the device stack itself opened.
            let totals = "fds \(fdCountBefore) -> \(ProcessResources.descriptorCount), threads \(threadCountBefore) -> \(ProcessResources.threadCount)"
            #expect(settled, "still open: \(left.values.map(\.identity)); worker threads still running: \(running); \(totals)")
        }
    }
}
