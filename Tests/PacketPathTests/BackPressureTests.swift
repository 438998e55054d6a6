#if canImport(Glibc)
import Glibc
#endif
import Sys
import Tap
import Testing
import VirtioNet
import VirtioNetTestSupport

/// The TAP backend against a stand-in for a TAP queue whose writes return EAGAIN when full: a unix
/// datagram socket pair with a small send buffer, read by the test at its own pace. (A real TAP on
/// Linux 6.18 takes every write, even with TUNSETSNDBUF and a slow qdisc behind it.)
@Suite("TAP back-pressure: a queue that would block makes the worker wait, never drop")
struct BackPressureTests {
    @Test("A burst larger than the queue can hold arrives whole and in order once the reader drains it; nothing is dropped")
    func burstWaitsForRoom() throws {
        var pair: [Int32] = [-1, -1]
        try #require(socketpair(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        let reader = OwnedFileDescriptor(taking: pair[1])
        var sendBuffer: Int32 = 4096
        setsockopt(pair[0], SOL_SOCKET, SO_SNDBUF, &sendBuffer, socklen_t(MemoryLayout<Int32>.size))
        let tap = try TapDevice.standIn(name: "standin0", queue: OwnedFileDescriptor(taking: pair[0]))
        let device = try NetDevice(configuration: NetConfiguration(mac: MACAddress(0x52, 0x54, 0, 0, 0, 1)), backend: TapBackend(tap: tap))
        let driver = try SimulatedNetDriver(device: device, threaded: true)
        defer { device.reset() }

        let frames = (0..<200).map { index in
            [0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1, 0x88, 0xb5, UInt8(index & 0xff), UInt8(index >> 8)]
                + [UInt8](repeating: UInt8(truncatingIfNeeded: index), count: 100)
        }
        #expect(driver.transmitBurst(frames.map { (frame: $0, segmentSize: Int?.none) }))
        var arrived: [[UInt8]] = []
        var buffer = [UInt8](repeating: 0, count: 2048)
        let deadline = SimulatedNetDriver.now() + 20
        while arrived.count < frames.count && SimulatedNetDriver.now() < deadline {
            var entry = pollfd(fd: reader.rawValue, events: Int16(POLLIN), revents: 0)
            _ = poll(&entry, 1, 100)
            while true {
                let count = buffer.withUnsafeMutableBytes { recv(reader.rawValue, $0.baseAddress, $0.count, 0) }
                if count <= 0 { break }
                arrived.append(Array(buffer[VirtioNetHeader.size..<count]))
            }
        }
        let firstDifference = Array(zip(arrived, frames)).firstIndex { $0.0 != $0.1 }
        #expect(arrived.count == frames.count && firstDifference == nil,
                "\(arrived.count) of \(frames.count) frames arrived; first that differs: \(String(describing: firstDifference))")
        let counters = device.queuePairCounters[0].transmit
        #expect(driver.waitUntil { counters.frames.current == 200 })
        #expect(counters.totalDrops == 0)
    }
}
