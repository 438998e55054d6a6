import GuestMemory
import Testing
import VhostUser
import VirtioNet
import VirtioNetTestSupport

@Suite("vhost-user: negotiation, queries and traffic")
struct VhostUserNegotiationTests {
    @Test("Frames of several sizes round-trip through the vhost-user device on both queue pairs")
    func framesRoundTripOnTwoQueuePairs() throws {
        let served = try ServedDevice(queuePairs: 2)
        defer { served.stop() }
        let frontend = try served.connect()
        let memory = try SimulatedGuestMemory()
        let guest = try frontend.negotiate(memory: memory, queuePairs: 2)
        #expect(served.device.isActive)
        let sizes = [60, 64, 65, 128, 512, 1000, 1514]
        #expect(roundTrip(guest, pair: 0, sizes: sizes, seed: 1))
        #expect(roundTrip(guest, pair: 1, sizes: sizes, seed: 101))
        // Both pairs carried their own frames, counted on the device's own counters. A worker adds up
        // a pass's frames after it published them, so the receive count may trail what the guest saw.
        #expect(served.device.queuePairCounters[0].transmit.frames.current == UInt64(sizes.count))
        #expect(served.device.queuePairCounters[1].transmit.frames.current == UInt64(sizes.count))
        #expect(eventually { served.device.queuePairCounters[1].receive.frames.current == UInt64(sizes.count) },
                "pair 1 received \(served.device.queuePairCounters[1].receive.frames.current)")
        // Interleaved traffic on both pairs at once.
        guest.postReceiveBuffers(pair: 0, count: 32)
        guest.postReceiveBuffers(pair: 1, count: 32)
        var sent: [[[UInt8]]] = [[], []]
        for index in 0..<32 {
            for pair in 0..<2 {
                let frame = ethernetFrame(length: 60 + index * 40, seed: UInt8(index + 50 * pair))
                sent[pair].append(frame)
                #expect(guest.transmit(frame, pair: pair))
            }
        }
        #expect(guest.receive(count: 32, pair: 0) == sent[0])
        #expect(guest.receive(count: 32, pair: 1) == sent[1])
    }

    /// QEMU with `csum=off,guest_csum=off` offers the TSO features without the checksum ones, and
    /// Linux's driver acknowledges them so: the device accepts that, leaves those offloads unused,
    /// says so once at notice level, and carries traffic.
    @Test("Segmentation offloads acknowledged without their checksum features are accepted and left unused; traffic flows")
    func offloadsWithoutTheirPrerequisites() throws {
        let capture = LogCapture()
        let served = try ServedDevice(logger: capture.logger())
        defer { served.stop() }
        let frontend = try served.connect()
        let checksums: UInt64 = 1 << 0 | 1 << 1  // CSUM, GUEST_CSUM
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(), wanted: ~checksums)
        #expect(guest.features & (1 << 7) != 0 && guest.features & (1 << 11) != 0, "GUEST_TSO4 and HOST_TSO4 acknowledged")
        #expect(served.device.isActive)
        #expect(served.device.effectiveFeatures?.isDisjoint(with: [.guestTSO4, .guestTSO6, .hostTSO4, .hostTSO6, .guestECN, .hostECN]) == true)
        #expect(served.backend.enabledReceiveOffloads == [], "no segmented or partially checksummed frames toward the guest")
        #expect(roundTrip(guest, sizes: [60, 1514]))
        let notices = capture.records.filter { $0.level == .notice && $0.message.contains("without their prerequisites") }
        #expect(notices.count == 1, "said once: \(notices.map(\.metadata))")
    }

    /// QEMU with `disable-modern=on`: the guest's legacy driver acknowledges no VERSION_1, and frames
    /// carry a 10-byte header unless it took mergeable buffers.
    @Test("A legacy driver (no VERSION_1) is served: frames round-trip after a 10-byte header, or 12 with mergeable buffers",
          arguments: [false, true])
    func legacyDriver(mergeable: Bool) throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let version1: UInt64 = 1 << 32, mergeableBit: UInt64 = 1 << 15
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory(), wanted: ~(version1 | (mergeable ? 0 : mergeableBit)))
        #expect(guest.features & version1 == 0)
        #expect(guest.headerSize == (mergeable ? 12 : 10))
        #expect(served.device.isActive)
        #expect(roundTrip(guest, sizes: [60, 64, 1000, 1514]))
    }

    @Test("Frames larger than one receive buffer arrive whole in mergeable buffers")
    func mergeableReceiveBuffers() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let guest = try frontend.negotiate(memory: try SimulatedGuestMemory())
        #expect(guest.features & (1 << 15) != 0, "MRG_RXBUF negotiated")
        guest.postReceiveBuffers(count: 16, size: 256)
        let frames = [300, 1000, 1514].map { ethernetFrame(length: $0, seed: UInt8($0 & 0xff)) }
        for frame in frames { #expect(guest.transmit(frame)) }
        #expect(guest.receive(count: 3) == frames)
    }

    @Test("GET_FEATURES offers VERSION_1, bit 30 (protocol features), LOG_ALL and GUEST_ANNOUNCE, and none of the control-queue features the frontend owns")
    func offeredFeatures() throws {
        let served = try ServedDevice(queuePairs: 2)
        defer { served.stop() }
        let frontend = try served.connect()
        let features = try frontend.getFeatures()
        #expect(features & (1 << 32) != 0, "VIRTIO_F_VERSION_1")
        #expect(features & Frontend.protocolFeaturesBit != 0, "VHOST_USER_F_PROTOCOL_FEATURES")
        for (bit, name) in [(17, "CTRL_VQ"), (18, "CTRL_RX"), (19, "CTRL_VLAN"), (23, "CTRL_MAC_ADDR"), (2, "CTRL_GUEST_OFFLOADS")] {
            #expect(features & (UInt64(1) << UInt64(bit)) == 0, "\(name) belongs to the frontend")
        }
        for (bit, name) in [(5, "MAC"), (3, "MTU"), (16, "STATUS"), (15, "MRG_RXBUF"), (26, "VHOST_F_LOG_ALL"), (21, "GUEST_ANNOUNCE (the frontend's, offered so it can offer it)")] {
            #expect(features & (UInt64(1) << UInt64(bit)) != 0, "\(name) offered")
        }
        // Everything offered but bits 30, 26 and 21 is a virtio feature of the device.
        #expect(features & ~(Frontend.protocolFeaturesBit | 1 << 26 | 1 << 21)
                    == served.device.offeredFeatures.subtracting([.ctrlVQ, .ctrlRx, .ctrlMACAddress, .ctrlGuestOffloads]).rawValue)
    }

    @Test("A frontend that acknowledges everything GET_FEATURES offered is accepted (MQ device)")
    func acknowledgingAllOfferedFeaturesIsAccepted() throws {
        let served = try ServedDevice(queuePairs: 2)
        defer { served.stop() }
        let frontend = try served.connect()
        let offered = try frontend.getFeatures()
        try frontend.setFeatures(offered & ~Frontend.protocolFeaturesBit | Frontend.protocolFeaturesBit)
        try frontend.setProtocolFeatures(try frontend.getProtocolFeatures() & Frontend.defaultProtocolFeatures)
        // With REPLY_ACK on, an accepted SET_FEATURES answers 0 to need_reply.
        let outcome = frontend.exchange(Frontend.Request.setFeatures.rawValue, flags: Frontend.version | Frontend.needReplyFlag,
                                        payload: LE.u64(offered))
        #expect(isSuccessAck(outcome), "SET_FEATURES with exactly the offered features: \(outcome)")
    }

    @Test("GET_PROTOCOL_FEATURES includes MQ, REPLY_ACK, NET_MTU, CONFIGURE_MEM_SLOTS and STATUS, not CONFIG (QEMU warns about it) nor what is unsupported")
    func protocolFeatures() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let features = try frontend.getProtocolFeatures()
        typealias P = Frontend.ProtocolFeature
        for (bit, name) in [(P.mq, "MQ"), (P.logShmfd, "LOG_SHMFD"), (P.replyAck, "REPLY_ACK"), (P.netMTU, "NET_MTU"),
                            (P.configureMemSlots, "CONFIGURE_MEM_SLOTS"), (P.status, "STATUS")] {
            #expect(features & bit != 0, "\(name) offered")
        }
        for (bit, name) in [(P.config, "CONFIG"), (P.backendReq, "BACKEND_REQ"), (P.inbandNotifications, "INBAND_NOTIFICATIONS")] {
            #expect(features & bit == 0, "\(name) not offered")
        }
    }

    @Test("GET_QUEUE_NUM, GET_MAX_MEM_SLOTS and GET_CONFIG describe the device", arguments: [1, 3])
    func queries(queuePairs: Int) throws {
        let served = try ServedDevice(queuePairs: queuePairs, mtu: 1400)
        defer { served.stop() }
        let frontend = try served.connect()
        try frontend.setProtocolFeatures(try frontend.getProtocolFeatures() & Frontend.defaultProtocolFeatures)
        #expect(try frontend.getQueueNum() == UInt64(queuePairs))
        #expect(try frontend.getMaxMemSlots() == 509)
        let config = try frontend.getConfig(offset: 0, size: 12)
        #expect(Array(config[0..<6]) == deviceMAC.array, "mac")
        #expect(LE.u16(config, at: 6) == 1, "status: link up")
        #expect(LE.u16(config, at: 8) == UInt16(queuePairs), "max_virtqueue_pairs")
        #expect(LE.u16(config, at: 10) == 1400, "mtu")
        #expect(config == served.device.configSpace.bytes)
        // A part of the space, and bytes past the fields (read as zero).
        #expect(try frontend.getConfig(offset: 6, size: 2) == [1, 0])
        #expect(try frontend.getConfig(offset: 10, size: 8) == LE.u16(1400) + [0, 0, 0, 0, 0, 0])
        #expect(try frontend.getStatus() == 0)
        try frontend.setStatus(0x0f)
        #expect(try frontend.getStatus() == 0x0f)
    }

    @Test("REPLY_ACK: need_reply on an accepted message answers 0; without REPLY_ACK nothing is answered")
    func replyAck() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let offered = try frontend.getFeatures()
        // Before REPLY_ACK is negotiated, need_reply is ignored: no answer, the connection stays.
        #expect(frontend.exchange(Frontend.Request.setFeatures.rawValue, flags: Frontend.version | Frontend.needReplyFlag,
                                  payload: LE.u64(offered), expectAnswer: false) == .noAnswer)
        try frontend.setProtocolFeatures(Frontend.ProtocolFeature.replyAck)
        #expect(isSuccessAck(frontend.exchange(Frontend.Request.setOwner.rawValue, flags: Frontend.version | Frontend.needReplyFlag)))
        // Without need_reply, no ack comes even with REPLY_ACK: the next reply is GET_FEATURES's.
        try frontend.send(Frontend.Request.setOwner.rawValue)
        #expect(try frontend.getFeatures() == offered)
    }
}
