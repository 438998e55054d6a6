import GuestMemory
import Sys
import Testing
import VirtioNet
import VirtioNetTestSupport
import Virtqueue

@Suite("Guest memory translation")
struct GuestMemoryTests {
    @Test func rangesAreBoundsChecked() throws {
        let guest = try SimulatedGuestMemory(regionSize: 1 << 16, regionCount: 2, base: GuestAddress(0x1000))
        let memory = guest.memory
        #expect(throws: GuestMemoryError.outOfRange(address: 0xfff, length: 2)) { try memory.hostPointer(GuestAddress(0xfff), length: 2) }
        #expect(throws: GuestMemoryError.overflow(address: .max, length: 2)) { try memory.hostPointer(GuestAddress(.max), length: 2) }
        let end = 0x1000 + 2 * UInt64(1 << 16)
        #expect(throws: GuestMemoryError.outOfRange(address: end - 4, length: 8)) { try memory.hostPointer(GuestAddress(end - 4), length: 8) }
        #expect(throws: GuestMemoryError.notContiguous(address: 0x1000 + (1 << 16) - 4, length: 8)) {
            try memory.hostPointer(GuestAddress(0x1000 + (1 << 16) - 4), length: 8)
        }

        // A range across the two regions becomes two iovecs, and copies see one sequence of bytes.
        var iovecs = IOVecArray(capacity: 4)
        let straddle = GuestAddress(0x1000 + (1 << 16) - 4)
        try memory.appendIOVecs(straddle, length: 8, to: &iovecs)
        #expect(iovecs.count == 2 && iovecs.base[0].iov_len == 4 && iovecs.base[1].iov_len == 4)
        try memory.writeBytes([1, 2, 3, 4, 5, 6, 7, 8], to: straddle)
        #expect(try memory.readBytes(straddle, count: 8) == [1, 2, 3, 4, 5, 6, 7, 8])

        // Too many segments: nothing is appended.
        var one = IOVecArray(capacity: 1)
        #expect(throws: GuestMemoryError.tooManySegments(limit: 1)) { try memory.appendIOVecs(straddle, length: 8, to: &one) }
        #expect(one.count == 0)
    }

    /// A guest with memory hot-plugged in many DIMMs has as many regions as vhost-user slots (509):
    /// every byte of every region translates to its own mapping, gaps and ends do not.
    @Test("509 regions with gaps between some: first, last and straddling bytes translate; gaps and ends do not",
          arguments: [1, 2, 8, 9, 509])
    func manyRegions(count: Int) throws {
        let fd = try MemFD.create(name: "many-regions", size: count * 4096)
        var regions: [GuestMemoryRegion] = []
        var starts: [UInt64] = []
        var start: UInt64 = 0x10_0000
        for index in 0..<count {
            // Every third region follows the previous one directly; the others leave a gap.
            if index % 3 != 0 { start += 4096 * 3 }
            starts.append(start)
            regions.append(try GuestMemoryRegion(
                description: MemoryRegionDescription(guestAddress: GuestAddress(start), size: 4096, mmapOffset: UInt64(index * 4096)), fd: fd.rawValue))
            start += 4096
        }
        let memory = try GuestMemory(regions: regions.shuffled())
        for (index, regionStart) in starts.enumerated() {
            let expected = memory.regions.first { $0.description.guestAddress.rawValue == regionStart }!
            #expect(try memory.hostPointer(GuestAddress(regionStart), length: 1) == expected.host)
            #expect(try memory.hostPointer(GuestAddress(regionStart + 4095), length: 1) == expected.host + 4095)
            #expect(throws: GuestMemoryError.self) { try memory.hostPointer(GuestAddress(regionStart + 4095), length: 2) }
            let followed = index + 1 < count && starts[index + 1] == regionStart + 4096
            if !followed {
                #expect(throws: GuestMemoryError.outOfRange(address: regionStart + 4096, length: 1)) {
                    try memory.hostPointer(GuestAddress(regionStart + 4096), length: 1)
                }
            } else {
                var iovecs = IOVecArray(capacity: 2)
                try memory.appendIOVecs(GuestAddress(regionStart + 4000), length: 200, to: &iovecs)
                #expect(iovecs.count == 2)
            }
        }
        #expect(throws: GuestMemoryError.outOfRange(address: 0x10_0000 - 1, length: 1)) { try memory.hostPointer(GuestAddress(0x10_0000 - 1), length: 1) }
    }

    @Test func overlappingRegionsAreRefused() throws {
        let fd = try MemFD.create(name: "overlap", size: 1 << 16)
        let a = try GuestMemoryRegion(description: MemoryRegionDescription(guestAddress: GuestAddress(0), size: 1 << 16), fd: fd.rawValue)
        let b = try GuestMemoryRegion(description: MemoryRegionDescription(guestAddress: GuestAddress(0x8000), size: 1 << 15), fd: fd.rawValue)
        #expect(throws: GuestMemoryError.self) { try GuestMemory(regions: [a, b]) }
        #expect(throws: GuestMemoryError.self) {
            try GuestMemoryRegion(description: MemoryRegionDescription(guestAddress: GuestAddress(.max - 10), size: 100), fd: fd.rawValue)
        }
        #expect(throws: GuestMemoryError.self) {
            try GuestMemoryRegion(description: MemoryRegionDescription(guestAddress: GuestAddress(0), size: 0), fd: fd.rawValue)
        }
    }

    @Test func frontendAddressesTranslate() throws {
        let guest = try SimulatedGuestMemory(regionSize: 1 << 16)
        let address = guest.allocate(64)
        let user = guest.userAddress(of: address)
        #expect(user != address.rawValue)
        #expect(try guest.memory.hostPointer(userAddress: user, length: 64) == guest.memory.hostPointer(address, length: 64))
        #expect(guest.memory.guestAddress(userAddress: user) == address)
    }

    @Test("Frames whose buffers straddle two regions round-trip")
    func framesAcrossRegions() throws {
        let guest = try SimulatedGuestMemory(regionSize: 1 << 20, regionCount: 2)
        let (_, driver, _) = try makeLoopbackDevice(guest: guest)
        driver.postReceiveBuffers(count: 200, size: 2000)
        for number in 0..<60 {
            let frame = ethernetFrame(length: 1000 + 7 * number, seed: UInt8(number))
            #expect(driver.transmit(frame))
            let received = driver.receive(count: 1)
            try #require(received.count == 1)
            #expect(received[0].frame == frame)
        }
    }

    @Test("Rings given as frontend (vhost-user) addresses work like guest-physical ones")
    func ringsAtFrontendAddresses() throws {
        let backend = try LoopbackBackend()
        let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC), backend: backend)
        let driver = try SimulatedNetDriver(device: device, frontendAddresses: true)
        driver.postReceiveBuffers(count: 40)
        let frame = ethernetFrame(length: 500)
        #expect(driver.transmit(frame))
        #expect(driver.receive(count: 1).first?.frame == frame)
    }

    @Test func queueSetupIsValidated() throws {
        let guest = try SimulatedGuestMemory(regionSize: 1 << 16)
        let queue = SimulatedQueue(guest: guest, size: 8, eventIndex: false)
        #expect(throws: QueueSetupError.invalidSize(12)) {
            try SplitQueue(memory: guest.memory, size: 12, rings: queue.rings, features: RingFeatures())
        }
        #expect(throws: QueueSetupError.invalidSize(65536)) {
            try SplitQueue(memory: guest.memory, size: 65536, rings: queue.rings, features: RingFeatures())
        }
        let misaligned = RingAddresses.guestPhysical(descriptorTable: GuestAddress(queue.descriptorTable.rawValue + 8),
                                                     availableRing: queue.availableRing, usedRing: queue.usedRing)
        #expect(throws: QueueSetupError.misaligned(ring: "descriptor table", address: queue.descriptorTable.rawValue + 8)) {
            try SplitQueue(memory: guest.memory, size: 8, rings: misaligned, features: RingFeatures())
        }
        let outside = RingAddresses.guestPhysical(descriptorTable: queue.descriptorTable, availableRing: queue.availableRing,
                                                  usedRing: GuestAddress(guest.end - 8))
        #expect(throws: QueueSetupError.self) {
            try SplitQueue(memory: guest.memory, size: 8, rings: outside, features: RingFeatures())
        }
    }
}
