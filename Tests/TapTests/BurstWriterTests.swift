#if canImport(Glibc)
import Glibc
#endif
import Sys
import Tap
import Testing

/// BurstWriter over a unix datagram socket pair: each write is one datagram, as each TAP write is one
/// frame, and a full send buffer answers EAGAIN, as a full TAP queue would.
@Suite("Burst writes: in order, stopping at the first frame that fails, the same with io_uring and writev")
struct BurstWriterTests {
    private final class Pair {
        let writer: OwnedFileDescriptor
        let reader: OwnedFileDescriptor
        init(sendBuffer: Int32) throws {
            var fds: [Int32] = [-1, -1]
            let type = Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue)
            guard socketpair(AF_UNIX, type, 0, &fds) == 0 else { throw SystemError(call: "socketpair", code: errno) }
            writer = OwnedFileDescriptor(taking: fds[0])
            reader = OwnedFileDescriptor(taking: fds[1])
            var size = sendBuffer
            setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        }
        /// Every datagram waiting, in order.
        func readAll() -> [[UInt8]] {
            var result: [[UInt8]] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let count = buffer.withUnsafeMutableBytes { recv(reader.rawValue, $0.baseAddress, $0.count, 0) }
                if count < 0 { return result }
                result.append(Array(buffer[0..<count]))
            }
        }
    }

    /// Writes `frames` with `writer`, returning (attempted, results by index).
    private func write(_ frames: [[UInt8]], with writer: BurstWriter) -> (Int, [Int: Int]) {
        var results: [Int: Int] = [:]
        var iovecs = frames.map { frame in
            let pointer = UnsafeMutableRawPointer.allocate(byteCount: max(frame.count, 1), alignment: 8)
            frame.withUnsafeBytes { pointer.copyMemory(from: $0.baseAddress!, byteCount: frame.count) }
            return iovec(iov_base: pointer, iov_len: frame.count)
        }
        defer { for vector in iovecs { vector.iov_base.deallocate() } }
        let attempted = iovecs.withUnsafeMutableBufferPointer { vectors in
            let slices = (0..<vectors.count).map { FrameSlice(iovecs: UnsafePointer(vectors.baseAddress! + $0), count: 1) }
            return slices.withUnsafeBufferPointer { buffer in writer.write(buffer) { results[$0] = $1 } }
        }
        return (attempted, results)
    }

    private static func frames(_ count: Int, size: Int = 200, from first: Int = 0) -> [[UInt8]] {
        (first..<first + count).map { [UInt8(truncatingIfNeeded: $0)] + [UInt8](repeating: UInt8(truncatingIfNeeded: $0), count: size - 1) }
    }

    @Test("A full descriptor: the burst stops at the frame that would block; after a drain the rest goes, in order",
          arguments: [true, false])
    func stopsAtWouldBlock(useURing: Bool) throws {
        let pair = try Pair(sendBuffer: 4096)
        let writer = BurstWriter(fd: pair.writer.rawValue, useURing: useURing)
        let burst = Self.frames(BurstWriter.maximumBurst)
        let (attempted, results) = write(burst, with: writer)
        #expect(attempted > 1 && attempted < burst.count, "the buffer holds some frames, not all")
        #expect(results.count == attempted, "only attempted frames are reported")
        #expect(results[attempted - 1] == -Int(EAGAIN))
        #expect((0..<attempted - 1).allSatisfy { results[$0] == 200 })
        var arrived = pair.readAll()
        #expect(arrived.count == attempted - 1)
        // The rest, from the frame that would have blocked on.
        var next = attempted - 1
        while next < burst.count {
            let (more, moreResults) = write(Array(burst[next...]), with: writer)
            let sent = (0..<more).filter { (moreResults[$0] ?? -1) >= 0 }.count
            next += sent
            arrived += pair.readAll()
            if sent == 0 { break }
        }
        let inOrder = arrived == burst
        #expect(inOrder, "\(arrived.count) of \(burst.count) frames, in order")
    }

    @Test("A frame the kernel refuses ends the burst there: it is reported, the frames after it are not attempted",
          arguments: [true, false])
    func stopsAtAFailure(useURing: Bool) throws {
        let pair = try Pair(sendBuffer: 65536)
        let writer = BurstWriter(fd: pair.writer.rawValue, useURing: useURing)
        var burst = Self.frames(10)
        burst[4] = [UInt8](repeating: 4, count: 300_000)  // larger than any datagram: EMSGSIZE
        let (attempted, results) = write(burst, with: writer)
        #expect(attempted == 5)
        #expect(results[4] == -Int(EMSGSIZE))
        #expect(results.count == 5)
        #expect(pair.readAll() == Array(burst[0..<4]))
    }
}
