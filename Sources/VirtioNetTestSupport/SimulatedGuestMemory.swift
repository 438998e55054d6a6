import GuestMemory
import Sys

/// Guest RAM for tests: memfd-backed regions mapped shared, and a bump allocator over them.
public final class SimulatedGuestMemory: @unchecked Sendable {
    public let memory: GuestMemory
    public let fds: [Int32]
    private var descriptors: [MemFDBox]
    private var next: UInt64
    public let base: GuestAddress
    public let end: UInt64

    private final class MemFDBox {
        let fd: OwnedFileDescriptor
        init(_ fd: consuming OwnedFileDescriptor) { self.fd = fd }
    }

    /// `regionCount` adjacent regions of `regionSize` bytes from `base`, each its own memfd, so that
    /// buffers can straddle a region boundary. User addresses are offset so they differ from guest ones.
    public init(regionSize: Int = 16 << 20, regionCount: Int = 1, base: GuestAddress = GuestAddress(0x10_0000),
                userAddressOffset: UInt64 = 0x7f00_0000_0000) throws {
        var regions: [GuestMemoryRegion] = []
        var boxes: [MemFDBox] = []
        for index in 0..<regionCount {
            let fd = try MemFD.create(name: "simulated-guest-\(index)", size: regionSize)
            let guest = base.rawValue + UInt64(index * regionSize)
            let description = MemoryRegionDescription(
                guestAddress: GuestAddress(guest), size: UInt64(regionSize), userAddress: guest + userAddressOffset
            )
            regions.append(try GuestMemoryRegion(description: description, fd: fd.rawValue))
            boxes.append(MemFDBox(fd))
        }
        memory = try GuestMemory(regions: regions)
        descriptors = boxes
        fds = boxes.map { $0.fd.rawValue }
        self.base = base
        next = base.rawValue
        end = base.rawValue + UInt64(regionCount * regionSize)
    }

    /// Allocates `size` bytes aligned to `alignment`. Wraps around when the end is reached: tests
    /// keep far less in flight than the memory holds.
    public func allocate(_ size: Int, alignment: UInt64 = 16) -> GuestAddress {
        var start = (next + alignment - 1) / alignment * alignment
        if start + UInt64(size) > end {
            start = (base.rawValue + (UInt64(ringArea) + alignment - 1)) / alignment * alignment
        }
        next = start + UInt64(size)
        return GuestAddress(start)
    }

    /// Bytes at the start kept for rings (never reused by the wrap-around).
    public var ringArea = 0

    /// Marks everything allocated so far as permanent (rings): the wrap-around starts after it.
    public func sealRingArea() { ringArea = Int(next - base.rawValue) }

    public func write(_ bytes: [UInt8], at address: GuestAddress) { try! memory.writeBytes(bytes, to: address) }
    public func read(_ address: GuestAddress, count: Int) -> [UInt8] { try! memory.readBytes(address, count: count) }
    public func store<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) { try! memory.store(value, at: address) }
    public func load<T: FixedWidthInteger>(_ type: T.Type, at address: GuestAddress) -> T { try! memory.load(type, at: address) }

    /// The frontend (user) address of a guest address, as a vhost-user frontend would send it.
    public func userAddress(of address: GuestAddress) -> UInt64 {
        for region in memory.regions where address.rawValue >= region.description.guestAddress.rawValue
            && address.rawValue < region.description.guestAddress.rawValue + region.description.size {
            return region.description.userAddress + (address.rawValue - region.description.guestAddress.rawValue)
        }
        return 0
    }
}
