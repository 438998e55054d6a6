#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import Sys
import Testing
import VirtioNet
import VirtioNetTestSupport

struct RingOptions: CustomTestStringConvertible, Sendable {
    var indirect: Bool
    var eventIndex: Bool
    var mergeable: Bool
    var packed = false
    var testDescription: String { "indirect=\(indirect) event_idx=\(eventIndex) mrg_rxbuf=\(mergeable) \(packed ? "packed" : "split")" }
    var layout: SimulatedQueue.Layout { packed ? .packed : .split }

    static let all: [RingOptions] = [false, true].flatMap { packed in
        [false, true].flatMap { indirect in
            [false, true].flatMap { eventIndex in
                [false, true].map { RingOptions(indirect: indirect, eventIndex: eventIndex, mergeable: $0, packed: packed) }
            }
        }
    }
    /// Legacy drivers know only the split ring.
    static let split = all.filter { !$0.packed }
}

@Suite("Frames round-trip guest -> device -> loopback -> device -> guest")
struct RoundTripTests {
    static let sizes = [14, 60, 64, 65, 1514, 1518, 4096, 9014, 32768, 65536]

    @Test(arguments: RingOptions.all)
    func framesOfManySizesComeBackIntact(options: RingOptions) throws {
        var without: VirtioNetFeatures = []
        if !options.eventIndex { without.insert(.eventIndex) }
        if !options.mergeable { without.insert(.mergeableRxBuffers) }
        let (device, driver, backend) = try makeLoopbackDevice(mtu: 65535, without: without, layout: options.layout)
        driver.useIndirect = options.indirect
        #expect(driver.features.contains(.eventIndex) == options.eventIndex)
        #expect(driver.features.contains(.mergeableRxBuffers) == options.mergeable)

        for (number, size) in Self.sizes.enumerated() {
            // Mergeable: many small buffers; otherwise a few buffers each big enough for any frame.
            if options.mergeable {
                driver.postReceiveBuffers(count: 40, size: 2048)
            } else {
                driver.postReceiveBuffers(count: 2, size: 65565 + 3, segments: 4)
            }
            let frame = ethernetFrame(length: size, seed: UInt8(number))
            let header = VirtioNetHeader(flags: .dataValid, numBuffers: 0)
            #expect(driver.transmit(frame, header: header, segmentSize: size > 4000 ? 1500 : nil))
            let received = driver.receive(count: 1)
            try #require(received.count == 1, "frame of \(size) bytes did not come back")
            #expect(received[0].frame == frame, "frame of \(size) bytes changed on the way")
            #expect(received[0].header.flags == .dataValid)
            if options.mergeable {
                #expect(received[0].buffers == (size + 12 + 2047) / 2048)
            } else {
                #expect(received[0].buffers == 1)
                #expect(received[0].header.numBuffers == 1)
            }
            #expect(driver.completedTransmits().count == 1)
        }
        let tx = device.queuePairCounters[0].transmit.snapshot
        let rx = device.queuePairCounters[0].receive.snapshot
        #expect(tx.frames == UInt64(Self.sizes.count))
        #expect(rx.frames == UInt64(Self.sizes.count))
        #expect(tx.bytes == UInt64(Self.sizes.reduce(0, +)))
        #expect(tx.drops.values.allSatisfy { $0 == 0 })
        #expect(rx.drops.values.allSatisfy { $0 == 0 })
        #expect(backend.pendingFrames(queue: 0) == 0)
    }

    /// A legacy driver (no VERSION_1) puts a 10-byte header in front of each frame unless it took
    /// mergeable buffers (then 12); the device reads and writes frames after that many bytes, never
    /// writes num_buffers into a 10-byte header, and tells the backend the header size.
    @Test("Legacy drivers: frames round-trip after a 10-byte header (12 with mergeable buffers)", arguments: RingOptions.split)
    func legacyDrivers(options: RingOptions) throws {
        var without: VirtioNetFeatures = [.version1]
        if !options.eventIndex { without.insert(.eventIndex) }
        if !options.mergeable { without.insert(.mergeableRxBuffers) }
        let recording = try HeaderSizeRecordingBackend()
        let device = try NetDevice(configuration: NetConfiguration(mac: guestMAC, mtu: 65535), backend: recording, logger: quietLogger)
        let driver = try SimulatedNetDriver(device: device, wanted: device.offeredFeatures.subtracting(without))
        driver.useIndirect = options.indirect
        #expect(driver.headerSize == (options.mergeable ? 12 : 10))
        #expect(recording.headerSizes.last == driver.headerSize, "the backend is told")
        for (number, size) in [14, 60, 1514, 9014, 65536].enumerated() {
            if options.mergeable {
                driver.postReceiveBuffers(count: 40, size: 2048)
            } else {
                driver.postReceiveBuffers(count: 1, size: 65565 + 3, segments: 4)
            }
            let frame = ethernetFrame(length: size, seed: UInt8(number))
            #expect(driver.transmit(frame, segmentSize: size > 4000 ? 1500 : nil))
            let received = driver.receive(count: 1)
            // Intact also means nothing was written after a 10-byte header (num_buffers has no place there).
            let intact = received.map(\.frame) == [frame]
            #expect(intact, "\(size) bytes")
            _ = driver.completedTransmits()
        }
        #expect(device.queuePairCounters[0].receive.snapshot.drops.values.allSatisfy { $0 == 0 })
    }

    @Test("GSO and checksum headers are passed through exactly")
    func headersArePreserved() throws {
        let (_, driver, _) = try makeLoopbackDevice()
        driver.postReceiveBuffers(count: 128, size: 2048)
        let headers = [
            VirtioNetHeader(flags: .needsCsum, csumStart: 34, csumOffset: 6),
            VirtioNetHeader(flags: .needsCsum, gsoType: .tcpv4, headerLength: 66, gsoSize: 1448, csumStart: 34, csumOffset: 16),
            VirtioNetHeader(flags: .needsCsum, gsoType: .tcpv6, ecn: true, headerLength: 86, gsoSize: 1428, csumStart: 54, csumOffset: 16),
            VirtioNetHeader(flags: .needsCsum, gsoType: .udp, headerLength: 42, gsoSize: 1472, csumStart: 34, csumOffset: 6),
        ]
        for header in headers {
            let frame = ethernetFrame(length: header.gsoType == VirtioNetHeader.GSOType.none ? 1000 : 60000)
            #expect(driver.transmit(frame, header: header))
            let received = driver.receive(count: 1)
            try #require(received.count == 1)
            var expected = header
            expected.numBuffers = received[0].header.numBuffers
            #expect(received[0].header == expected)
            #expect(received[0].frame == frame)
        }
    }

    @Test("A burst of frames gets far fewer interrupts than frames with event idx")
    func burstsAreBatched() throws {
        let (device, driver, _) = try makeLoopbackDevice()
        driver.postReceiveBuffers(count: 200, size: 2048)
        let frames = (0..<150).map { ethernetFrame(length: 100 + $0, seed: UInt8($0)) }
        // Post all without letting the device run, then let it run once.
        driver.drive = { _ in }
        for frame in frames { #expect(driver.transmit(frame)) }
        driver.drive = { $0.poll() }
        let received = driver.receive(count: frames.count)
        #expect(received.map(\.frame) == frames)
        let rx = device.queuePairCounters[0].receive.snapshot
        #expect(rx.interrupts >= 1)
        #expect(rx.interrupts <= 3, "one interrupt per burst at most (event idx)")
    }
}

/// A loopback backend that notes each header size it is told.
final class HeaderSizeRecordingBackend: PacketBackend {
    let inner: LoopbackBackend
    private let sizes = Mutex<[Int]>([])
    init() throws { inner = try LoopbackBackend() }
    var headerSizes: [Int] { sizes.withLock { $0 } }
    var queuePairs: Int { inner.queuePairs }
    var receiveOffloads: OffloadSet { inner.receiveOffloads }
    var transmitOffloads: OffloadSet { inner.transmitOffloads }
    func setReceiveOffloads(_ offloads: OffloadSet) throws(BackendError) { try inner.setReceiveOffloads(offloads) }
    func setActiveQueuePairs(_ count: Int) throws(BackendError) { try inner.setActiveQueuePairs(count) }
    func setHeaderSize(_ size: Int) throws(BackendError) { sizes.withLock { $0.append(size) } }
    func transmit(queue: Int, frame: UnsafeBufferPointer<iovec>) -> TransmitOutcome { inner.transmit(queue: queue, frame: frame) }
    func receive(queue: Int, into buffers: UnsafeBufferPointer<iovec>) -> ReceiveOutcome { inner.receive(queue: queue, into: buffers) }
    func descriptor(queue: Int) -> Int32 { inner.descriptor(queue: queue) }
}
