// The device in manual mode with a simulated guest and a sink backend, driven one frame at a time:
// the guest posts and the device processes in bursts, as a real driver and worker do.
import GuestMemory
import VirtioNet
import VirtioNetTestSupport

public let mac = MACAddress(0x52, 0x54, 0x00, 0x00, 0x00, 0x01)
public let burst = 256

public func frame(_ size: Int) -> [UInt8] {
    mac.array + [0x52, 0x54, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00] + [UInt8](repeating: 0xab, count: size - 14)
}

/// The device in manual mode with a transmit ring full of `size`-byte frames, recycled after use.
public final class TransmitBench {
    let device: NetDevice
    let driver: SimulatedNetDriver
    let queue: SimulatedQueue
    var pending = 0

    /// With `logging`, the device logs the pages it writes (live migration) into a log it never reads.
    public init(size: Int, logging: Bool = false) throws {
        let backend = try SinkBackend()
        device = try NetDevice(configuration: NetConfiguration(mac: mac, mtu: 65535, maximumQueueSize: 1024), backend: backend)
        driver = try SimulatedNetDriver(device: device, queueSize: burst, guest: SimulatedGuestMemory(regionSize: 64 << 20))
        driver.drive = { _ in }
        queue = driver.transmitQueues[0]
        if logging { device.startDirtyLogging(into: DirtyLog(covering: driver.guest.end)) }
        for _ in 0..<burst { driver.transmit(frame(size)) }
        device.poll()
        queue.recycleUsed()
    }

    @inline(__always) public func oneFrame() {
        pending += 1
        if pending == burst {
            device.poll()
            queue.recycleUsed()
            pending = 0
        }
    }
}

/// The device in manual mode receiving `size`-byte frames into recycled guest buffers.
public final class ReceiveBench {
    let device: NetDevice
    let driver: SimulatedNetDriver
    let queue: SimulatedQueue
    let backend: SinkBackend
    let framesPerPoll: Int
    var pending = 0

    /// With `logging`, the device logs the pages it writes (live migration) into a log it never reads.
    public init(size: Int, logging: Bool = false) throws {
        backend = try SinkBackend(receiveFrame: VirtioNetHeader().bytes + frame(size))
        device = try NetDevice(configuration: NetConfiguration(mac: mac, mtu: 65535, maximumQueueSize: 1024), backend: backend)
        driver = try SimulatedNetDriver(device: device, queueSize: 1024, guest: SimulatedGuestMemory(regionSize: 64 << 20))
        driver.drive = { _ in }
        queue = driver.receiveQueues[0]
        if logging { device.startDirtyLogging(into: DirtyLog(covering: driver.guest.end)) }
        // Mergeable 4 KiB buffers, like a Linux guest's; 64 KiB frames take 17 each.
        driver.postReceiveBuffers(count: 1024, size: 4096)
        framesPerPoll = min(burst, 1024 / ((size + 12 + 4095) / 4096) / 2)
        device.poll()
    }

    @inline(__always) public func oneFrame() {
        pending += 1
        if pending == framesPerPoll {
            backend.receiveQuota = framesPerPoll
            device.poll()
            queue.recycleUsed()
            pending = 0
        }
    }
}

