// A VMM's side of a virtio-net device: guest RAM in a memfd, a TAP, and the rings the guest driver
// programmed. Run as root (it creates a TAP): swift run LibraryExample [TAP-NAME]
import GuestMemory
import Logging
import Sys
import VirtioNet

// Guest RAM: one region at guest-physical 0, backed by a memfd the VMM maps too.
let ramSize = 64 << 20
let ram = try MemFD.create(name: "guest-ram", size: ramSize)
let memory = try GuestMemory(regions: [
    GuestMemoryRegion(description: MemoryRegionDescription(guestAddress: GuestAddress(0), size: UInt64(ramSize)), fd: ram.rawValue),
])

// The device: a TAP with one queue pair (created if missing, attached if it exists).
let tapName = CommandLine.arguments.dropFirst().first ?? "vmtap0"
let device = try NetDevice(
    configuration: NetConfiguration(mac: MACAddress(string: "52:54:00:12:34:56")!, mtu: 1500, queuePairs: 1),
    backend: try TapBackend(name: tapName, queuePairs: 1),
    logger: Logger(label: "vmm.net0"))

// Feature negotiation: advertise `offeredFeatures`; pass on what the driver acknowledges (FEATURES_OK).
print("offered:", device.offeredFeatures)
try device.acknowledge(features: device.offeredFeatures)   // a real VMM passes the driver's choice
print("config space:", device.configSpace.bytes)           // served to the driver's config reads

// DRIVER_OK: each queue's size and ring addresses as the driver programmed them, an eventfd the
// guest's notifications arrive on (ioeventfd) and one that interrupts the guest (irqfd).
var queues: [QueueConfiguration] = []
for index in 0..<2 {  // 0: receive, 1: transmit (2: control, when CTRL_VQ is negotiated)
    let base = UInt64(index) << 16
    queues.append(QueueConfiguration(
        index: index, size: 256,
        rings: .guestPhysical(descriptorTable: GuestAddress(base), availableRing: GuestAddress(base + 0x1000),
                              usedRing: GuestAddress(base + 0x2000)),
        kick: try EventFD(), call: try EventFD()))
}
try device.activate(memory: memory, queues: queues)        // starts one worker thread per queue pair
print("active on", tapName, "with features", device.negotiatedFeatures!)

// The guest runs; the workers move frames between its rings and the TAP. On a device reset:
let stoppedAt = device.reset()                             // workers stop; where each queue stopped
print("reset; queues stopped at", stoppedAt.map { "\($0.index):\($0.nextAvailableIndex)" })
