import Testing
import VirtioNet
import VirtioNetTestSupport

private let ok: UInt8 = 0
private let err: UInt8 = 1

private func le16(_ value: Int) -> [UInt8] { [UInt8(value & 0xff), UInt8((value >> 8) & 0xff)] }
private func le32(_ value: Int) -> [UInt8] { le16(value & 0xffff) + le16(value >> 16) }
private func le64(_ value: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) } }
private func macTable(_ macs: [MACAddress]) -> [UInt8] { le32(macs.count) + macs.flatMap(\.array) }

@Suite("Control queue commands get the right ack and take effect")
struct ControlQueueTests {
    @Test func receiveModeCommands() throws {
        let (device, driver, _) = try makeLoopbackDevice()
        #expect(device.receiveFilter.promiscuous, "promiscuous until the driver says otherwise, as in QEMU")
        #expect(driver.control(class: 0, command: 0, data: [0]) == ok)  // PROMISC off
        #expect(driver.control(class: 0, command: 1, data: [1]) == ok)  // ALLMULTI on
        #expect(device.receiveFilter.promiscuous == false)
        #expect(device.receiveFilter.allMulticast)
        #expect(driver.control(class: 0, command: 0, data: [2]) == err, "only 0 and 1 are valid")
        #expect(driver.control(class: 0, command: 0, data: [1, 0]) == err, "one byte of data")
        #expect(driver.control(class: 0, command: 9, data: [1]) == err, "no such command")
    }

    @Test func receiveFilterDropsFramesForOtherAddresses() throws {
        let (device, driver, backend) = try makeLoopbackDevice()
        #expect(driver.control(class: 0, command: 0, data: [0]) == ok)
        driver.postReceiveBuffers(count: 100)
        let other = MACAddress(0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc)
        let multicast = MACAddress(0x01, 0x00, 0x5e, 0x00, 0x00, 0x01)
        for destination in [other, guestMAC, MACAddress.broadcast, multicast] {
            backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 64, destination: destination))
        }
        let received = driver.receive(count: 2)
        #expect(received.map { Array($0.frame[0..<6]) } == [guestMAC.array, MACAddress.broadcast.array])
        #expect(device.queuePairCounters[0].receive.dropped(.filtered) == 2)

        // Put the other unicast and the multicast address in the MAC table: both pass now.
        #expect(driver.control(class: 1, command: 0, data: macTable([other]) + macTable([multicast])) == ok)
        #expect(device.receiveFilter.unicast == [other] && device.receiveFilter.multicast == [multicast])
        for destination in [other, multicast] {
            backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 64, destination: destination))
        }
        #expect(driver.receive(count: 2).count == 2)
    }

    @Test func macTableWithBadLengthsIsRefused() throws {
        let (_, driver, _) = try makeLoopbackDevice()
        let mac = MACAddress(0x52, 0x54, 0x00, 0x01, 0x02, 0x03)
        #expect(driver.control(class: 1, command: 0, data: macTable([mac])) == err, "the multicast table is missing")
        #expect(driver.control(class: 1, command: 0, data: le32(5) + mac.array + macTable([])) == err, "5 entries claimed, 1 given")
        #expect(driver.control(class: 1, command: 0, data: le32(0x7fff_ffff) + macTable([])) == err, "huge count")
        #expect(driver.control(class: 1, command: 0, data: macTable([mac]) + macTable([]) + [0]) == err, "trailing byte")
        #expect(driver.control(class: 1, command: 0, data: macTable([]) + macTable([])) == ok)
    }

    @Test func macAddressSet() throws {
        let (device, driver, _) = try makeLoopbackDevice()
        let mac = MACAddress(0x52, 0x54, 0x00, 0x99, 0x88, 0x77)
        #expect(driver.control(class: 1, command: 1, data: mac.array) == ok)
        #expect(device.configSpace.mac == mac)
        #expect(driver.control(class: 1, command: 1, data: [1, 2, 3, 4, 5, 6]) == err, "multicast address")
        #expect(driver.control(class: 1, command: 1, data: [1, 2, 3]) == err, "short")
        #expect(device.configSpace.mac == mac)
    }

    @Test func queuePairsSetIsRangeChecked() throws {
        let (device, driver, backend) = try makeLoopbackDevice(queuePairs: 4)
        #expect(driver.features.contains(.mq))
        #expect(driver.control(class: 4, command: 0, data: le16(4)) == ok)
        #expect(device.activeQueuePairs == 4 && backend.activeQueuePairs == 4)
        #expect(driver.control(class: 4, command: 0, data: le16(2)) == ok)
        #expect(backend.activeQueuePairs == 2)
        #expect(driver.control(class: 4, command: 0, data: le16(0)) == err)
        #expect(driver.control(class: 4, command: 0, data: le16(5)) == err)
        #expect(driver.control(class: 4, command: 0, data: le16(0x8000)) == err)
        #expect(driver.control(class: 4, command: 0, data: [2]) == err, "le16 expected")
        #expect(device.activeQueuePairs == 2, "a refused command changes nothing")
    }

    @Test func queuePairsSetWithoutMQIsRefused() throws {
        let (_, driver, _) = try makeLoopbackDevice(queuePairs: 1)
        #expect(!driver.features.contains(.mq))
        #expect(driver.control(class: 4, command: 0, data: le16(1)) == err)
    }

    @Test func guestOffloadsSetIsLimitedToNegotiatedOffloads() throws {
        let (device, driver, backend) = try makeLoopbackDevice(without: [.guestUFO])
        let csumAndTSO4 = VirtioNetFeatures([.guestCsum, .guestTSO4])
        #expect(driver.control(class: 5, command: 0, data: le64(csumAndTSO4.rawValue)) == ok)
        #expect(backend.enabledReceiveOffloads == [.csum, .tso4])
        #expect(driver.control(class: 5, command: 0, data: le64(VirtioNetFeatures.guestUFO.rawValue | VirtioNetFeatures.guestCsum.rawValue)) == err, "UFO was not negotiated")
        #expect(driver.control(class: 5, command: 0, data: le64(VirtioNetFeatures.mq.rawValue)) == err, "not an offload")
        #expect(driver.control(class: 5, command: 0, data: le64(VirtioNetFeatures.guestTSO4.rawValue)) == err, "TSO4 needs CSUM")
        #expect(driver.control(class: 5, command: 0, data: le64(0)) == ok)
        #expect(backend.enabledReceiveOffloads == [])
        _ = device
    }

    @Test func unknownOrUnofferedClassesAreRefused() throws {
        let (_, driver, _) = try makeLoopbackDevice()
        #expect(driver.control(class: 2, command: 0, data: le16(5)) == err, "VLAN filtering not offered")
        #expect(driver.control(class: 3, command: 0, data: []) == err, "announce not offered")
        #expect(driver.control(class: 77, command: 0, data: [1]) == err)
    }

    @Test func receiveModeWithoutCtrlRxIsRefused() throws {
        let (_, driver, _) = try makeLoopbackDevice(without: [.ctrlRx])
        #expect(driver.control(class: 0, command: 0, data: [0]) == err)
    }
}

@Suite("Feature negotiation and config space")
struct FeatureTests {
    @Test func offeredFeaturesFollowTheBackend() throws {
        let full = try NetDevice(configuration: NetConfiguration(mac: guestMAC, queuePairs: 2), backend: LoopbackBackend(queuePairs: 2))
        let expected: VirtioNetFeatures = [
            .version1, .csum, .guestCsum, .guestTSO4, .guestTSO6, .guestECN, .guestUFO, .hostTSO4, .hostTSO6, .hostECN,
            .hostUFO, .mergeableRxBuffers, .status, .ctrlVQ, .ctrlRx, .ctrlMACAddress, .mq, .mtu, .mac, .eventIndex,
            .indirectDescriptors, .ctrlGuestOffloads,
        ]
        #expect(full.offeredFeatures.isSuperset(of: expected))
        let plain = try NetDevice(configuration: NetConfiguration(mac: guestMAC), backend: LoopbackBackend(offloads: []))
        #expect(plain.offeredFeatures.isDisjoint(with: VirtioNetFeatures.guestOffloads.union(.hostOffloads)))
        #expect(!plain.offeredFeatures.contains(.mq))
        let tsoOnly = try NetDevice(configuration: NetConfiguration(mac: guestMAC, offloads: [.csum, .tso4]), backend: LoopbackBackend())
        #expect(tsoOnly.offeredFeatures.intersection(VirtioNetFeatures.guestOffloads) == [.guestCsum, .guestTSO4])
    }

    @Test func unofferedOrInconsistentFeaturesAreRefused() throws {
        let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC), backend: LoopbackBackend(offloads: [.csum]))
        #expect(throws: NetDeviceError.featuresNotOffered(.guestTSO4)) {
            try device.acknowledge(features: [.version1, .guestCsum, .guestTSO4])
        }
        #expect(throws: NetDeviceError.featuresNotOffered(.mq)) { try device.acknowledge(features: [.version1, .mq, .ctrlVQ]) }
        #expect(device.negotiatedFeatures == nil)
        try device.acknowledge(features: [.mac])  // a legacy driver: served with the 10-byte header
        #expect(device.negotiatedFeatures == [.mac])
        try device.acknowledge(features: [.version1, .mac, .csum])
        #expect(device.negotiatedFeatures == [.version1, .mac, .csum])
    }

    @Test("Features acknowledged without their prerequisites are accepted and not used (as real drivers do)")
    func featuresWithoutPrerequisites() throws {
        let backend = try LoopbackBackend()
        let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC), backend: backend)
        let acknowledged: VirtioNetFeatures = [.version1, .ctrlRx, .guestTSO4, .guestECN, .hostTSO6, .hostECN, .mergeableRxBuffers]
        try device.acknowledge(features: acknowledged)
        #expect(device.negotiatedFeatures == acknowledged)
        #expect(device.effectiveFeatures == [.version1, .mergeableRxBuffers])
        #expect(backend.enabledReceiveOffloads == [])
        #expect(VirtioNetFeatures([.guestCsum, .guestTSO4, .guestECN]).usable.ignored == [])
        #expect(VirtioNetFeatures([.guestCsum, .guestECN]).usable.ignored == .guestECN, "ECN needs TSO")
    }

    @Test func configSpaceLayout() throws {
        let device = try NetDevice(configuration: NetConfiguration(mac: MACAddress(0x52, 0x54, 0, 0x12, 0x34, 0x56), mtu: 9000, queuePairs: 3),
                                   backend: LoopbackBackend(queuePairs: 4))
        #expect(device.configSpace.bytes == [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 3, 0, 0x28, 0x23])
        #expect(device.configSpace.read(offset: 10, length: 4) == [0x28, 0x23, 0, 0])
        device.setLinkUp(false)
        #expect(device.configSpace.status == 0)
    }

    @Test func invalidConfigurationsAreRefused() throws {
        let backend = try LoopbackBackend()
        #expect(throws: NetDeviceError.self) { try NetDevice(configuration: NetConfiguration(mac: guestMAC, mtu: 67), backend: backend) }
        #expect(throws: NetDeviceError.self) { try NetDevice(configuration: NetConfiguration(mac: guestMAC, queuePairs: 2), backend: backend) }
        #expect(throws: NetDeviceError.self) { try NetDevice(configuration: NetConfiguration(mac: guestMAC, maximumQueueSize: 1000), backend: backend) }
        #expect(throws: NetDeviceError.self) {
            try NetDevice(configuration: NetConfiguration(mac: MACAddress(1, 0, 0, 0, 0, 0)), backend: backend)
        }
    }

    @Test func headerBytesRoundTrip() {
        let header = VirtioNetHeader(flags: .needsCsum, gsoType: .tcpv6, ecn: true, headerLength: 0x1234, gsoSize: 1448,
                                     csumStart: 54, csumOffset: 16, numBuffers: 3)
        #expect(header.bytes == [1, 0x84, 0x34, 0x12, 0xa8, 0x05, 54, 0, 16, 0, 3, 0])
        #expect(VirtioNetHeader(header.bytes) == header)
    }
}
