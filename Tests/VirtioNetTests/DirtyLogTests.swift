#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Synchronization
import Sys
import Testing
import VirtioNet
import VirtioNetTestSupport

/// The pages of `length` bytes at `address`.
private func pages(_ address: UInt64, _ length: UInt64) -> Set<UInt64> {
    Set(stride(from: address / 4096 * 4096, through: (address + length - 1) / 4096 * 4096, by: 4096))
}

@Suite("Dirty logging: exactly the pages the device writes, only while logging")
struct DirtyLogTests {
    @Test("The bitmap: one bit per 4 KiB page, ranges across page boundaries, marks past the end dropped, collect clears")
    func bitmap() {
        let log = DirtyLog(covering: 64 * 4096)
        #expect(log.size == 8)
        log.mark(4095, length: 2)  // the last byte of page 0 and the first of page 1
        log.mark(10 * 4096, length: 1)
        log.mark(63 * 4096 + 100, length: 4096)  // page 63, and page 64, past the end
        log.mark(5 * 4096, length: 0)
        #expect(log.isDirty(0) && log.isDirty(4096) && !log.isDirty(2 * 4096))
        #expect(log.collect() == [0, 4096, 10 * 4096, 63 * 4096])
        #expect(log.collect().isEmpty, "collect clears")
    }

    @Test("A log shared as a memfd (vhost-user SET_LOG_BASE) is the frontend's bitmap, at its offset")
    func sharedLog() throws {
        let fd = try MemFD.create(name: "dirty-log", size: 8192)
        let log = try DirtyLog(fd: fd.rawValue, size: 4096, offset: 100)
        log.mark(9 * 4096, length: 1)  // byte 1, bit 1
        var byte: UInt8 = 0
        #expect(pread(fd.rawValue, &byte, 1, 101) == 1)
        #expect(byte == 0b10)
        #expect(throws: GuestMemoryError.self) { try DirtyLog(fd: fd.rawValue, size: 8192, offset: 1) }
    }

    @Test("Frames received mark the pages of the bytes written (header, num_buffers and frame), transmits only their used ring; control acks their byte")
    func exactPages() throws {
        let (device, driver, backend) = try makeLoopbackDevice()
        let guest = driver.guest
        let end = guest.end
        let log = DirtyLog(covering: end)
        device.startDirtyLogging(into: log)
        let rx = driver.receiveQueues[0], tx = driver.transmitQueues[0]
        let usedRX = pages(rx.usedRing.rawValue, UInt64(6 + 8 * rx.size))
        let usedTX = pages(tx.usedRing.rawValue, UInt64(6 + 8 * tx.size))

        // Transmit: the device reads the frame; it writes only the used ring.
        _ = log.collect()
        #expect(driver.transmit(ethernetFrame(length: 1000)))
        #expect(backend.drain(queue: 0).count == 1, "sent (and not looped back to the guest)")
        _ = driver.completedTransmits()
        #expect(Set(log.collect()).subtracting(usedRX) == usedTX, "transmit: the TX used ring")

        // Receive: a 3000-byte frame into one 8 KiB buffer that starts 100 bytes before a page
        // boundary: the pages of the 3012 bytes written, not the rest of the buffer.
        let buffer = guest.allocate(3 * 4096, alignment: 4096).rawValue + 4096 - 100
        _ = rx.add([(GuestAddress(buffer), 8192, true)])
        _ = log.collect()
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 3000))
        device.poll()
        #expect(driver.receivedFrames().count == 1)
        let written = pages(buffer, 3012)
        #expect(written.count == 2)
        #expect(Set(log.collect()) == written.union(usedRX), "receive: the frame's pages and the RX used ring")

        // Mergeable buffers: a frame over three 2 KiB buffers marks each buffer's written part.
        let buffers = (0..<3).map { _ in guest.allocate(4096, alignment: 4096).rawValue + 2048 }
        for address in buffers { _ = rx.add([(GuestAddress(address), 2048, true)]) }
        _ = log.collect()
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 4500))
        device.poll()
        #expect(driver.receivedFrames().first?.buffers == 3)
        let mergeable = pages(buffers[0], 2048).union(pages(buffers[1], 2048)).union(pages(buffers[2], 4512 - 4096))
        #expect(Set(log.collect()) == mergeable.union(usedRX))

        // Off: nothing is marked.
        device.stopDirtyLogging()
        #expect(driver.transmit(ethernetFrame(length: 100)))
        driver.postReceiveBuffers(count: 1)
        backend.inject(queue: 0, frame: VirtioNetHeader().bytes + ethernetFrame(length: 100))
        device.poll()
        #expect(log.collect().isEmpty)
    }

    @Test("The control queue's ack byte and used ring are marked, not the command it read")
    func controlAck() throws {
        let (device, driver, _) = try makeLoopbackDevice(queuePairs: 2)
        let log = DirtyLog(covering: driver.guest.end)
        let control = try #require(driver.controlQueue)
        // VQ_PAIRS_SET 2, the command and the ack byte on pages of their own.
        let command = driver.guest.allocate(4096, alignment: 4096)
        driver.guest.write([4, 0, 2, 0], at: command)
        let ack = GuestAddress(driver.guest.allocate(8192, alignment: 4096).rawValue + 4096 + 123)
        device.startDirtyLogging(into: log)
        let old = control.availableIndex
        _ = control.add([(command, 4, false), (ack, 1, true)])
        driver.kick(queue: control, index: device.controlQueueIndex(features: driver.features), since: old)
        #expect(driver.waitUntil { control.usedIndex == control.availableIndex })
        #expect(driver.guest.read(ack, count: 1) == [0])
        let used = pages(control.usedRing.rawValue, UInt64(6 + 8 * control.size))
        #expect(Set(log.collect()) == used.union([ack.rawValue / 4096 * 4096]))
    }

    @Test("Logging switched on and off while two queue pairs carry traffic: no frame lost, and frames received while on are marked")
    func switchedUnderTraffic() throws {
        let (device, driver, _) = try makeLoopbackDevice(queuePairs: 2, threaded: true)
        defer { device.reset() }
        let log = DirtyLog(covering: driver.guest.end)
        var sent: [[[UInt8]]] = [[], []]
        var received: [[[UInt8]]] = [[], []]
        for round in 0..<20 {
            if round % 2 == 0 { device.startDirtyLogging(into: log) } else { device.stopDirtyLogging() }
            for pair in 0..<2 {
                driver.postReceiveBuffers(pair: pair, count: 8)
                for index in 0..<8 {
                    let frame = ethernetFrame(length: 60 + 97 * index + round, seed: UInt8(truncatingIfNeeded: round * 16 + index + pair))
                    sent[pair].append(frame)
                    #expect(driver.transmit(frame, pair: pair))
                }
            }
            for pair in 0..<2 {
                received[pair] += driver.receive(count: 8, pair: pair).map(\.frame)
                _ = driver.completedTransmits(pair: pair)
            }
            if round % 2 == 0 { #expect(!log.collect().isEmpty, "round \(round): frames received while logging marked pages") }
        }
        device.stopDirtyLogging()
        for pair in 0..<2 {
            let intact = received[pair] == sent[pair]
            #expect(intact, "pair \(pair): \(received[pair].count) of \(sent[pair].count) frames, in order")
        }
    }
}
