// The library at work: a VMM's view of a virtio-net device. Here the "VMM" is this program and the
// guest is the simulated driver from VirtioNetTestSupport; a real VMM passes its own guest memory,
// ring addresses and eventfds instead.
import GuestMemory
import Logging
import VirtioNet
import VirtioNetTestSupport

let mac = MACAddress(string: "52:54:00:12:34:56")!
let backend = try LoopbackBackend(queuePairs: 1)          // a TapDevice in production
let device = try NetDevice(
    configuration: NetConfiguration(mac: mac, mtu: 1500, queuePairs: 1),
    backend: backend, logger: Logger(label: "example"))
print("offered features:", device.offeredFeatures)
print("config space:", device.configSpace.bytes)

// The simulated guest negotiates, lays out rings in memfd memory and activates the device:
// device.acknowledge(features:) then device.activate(memory:queues:).
let guest = try SimulatedNetDriver(device: device)
print("negotiated:", device.negotiatedFeatures!)

guest.postReceiveBuffers(count: 64, size: 2048)
let frame = [UInt8](repeating: 0xff, count: 6) + mac.array + [0x08, 0x06] + [UInt8](repeating: 0, count: 46)
guest.transmit(frame)                                     // guest -> device -> loopback
let received = guest.receive(count: 1)                    // loopback -> device -> guest
print("guest received \(received.count) frame(s) of \(received.first?.frame.count ?? 0) bytes, intact: \(received.first?.frame == frame)")

let counters = device.queuePairCounters[0]
print("tx frames:", counters.transmit.frames.current, "rx frames:", counters.receive.frames.current)
device.reset()
