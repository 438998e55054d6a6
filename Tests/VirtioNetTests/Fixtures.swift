import GuestMemory
import Logging
import VirtioNet
import VirtioNetTestSupport

let guestMAC = MACAddress(0x52, 0x54, 0x00, 0x00, 0x00, 0x01)
let peerMAC = MACAddress(0x52, 0x54, 0x00, 0x00, 0x00, 0x02)

/// An Ethernet frame of exactly `length` bytes (>= 14) to `destination`, with a recognisable payload.
func ethernetFrame(length: Int, destination: MACAddress = guestMAC, source: MACAddress = peerMAC, seed: UInt8 = 0) -> [UInt8] {
    precondition(length >= 14)
    var frame = destination.array + source.array + [0x08, 0x00]
    frame.reserveCapacity(length)
    for index in 0..<(length - 14) { frame.append(UInt8(truncatingIfNeeded: index &* 7 &+ Int(seed))) }
    return frame
}

/// A device on a loopback backend with a driver that negotiated `wanted` (all offered when nil).
func makeLoopbackDevice(
    mtu: Int = 1500, queuePairs: Int = 1, wanted: VirtioNetFeatures? = nil, without: VirtioNetFeatures = [],
    queueSize: Int = 256, layout: SimulatedQueue.Layout = .split, guest: SimulatedGuestMemory? = nil, threaded: Bool = false
) throws -> (device: NetDevice, driver: SimulatedNetDriver, backend: LoopbackBackend) {
    let backend = try LoopbackBackend(queuePairs: queuePairs)
    let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC, mtu: mtu, queuePairs: queuePairs), backend: backend)
    let features = (wanted ?? device.offeredFeatures).subtracting(without)
    let driver = try SimulatedNetDriver(device: device, wanted: features, queueSize: queueSize, layout: layout, guest: guest, threaded: threaded)
    return (device, driver, backend)
}

/// A logger that drops everything (hostile-guest tests provoke warnings on purpose).
let quietLogger = Logger(label: "virtio-net-tests", factory: { _ in SwiftLogNoOpLogHandler() })
