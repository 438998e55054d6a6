#if canImport(Glibc)
import Glibc
#endif
import GuestMemory
import Sys
import Testing
import VhostUser
import VirtioNet
import VirtioNetTestSupport

/// The dirty log as QEMU shares it: a memfd, one bit per 4 KiB guest page from guest address 0.
private final class SharedLog {
    let fd: OwnedFileDescriptor
    let size: Int
    init(covering end: UInt64) throws {
        size = Int((end / 4096 + 7) / 8)
        fd = try MemFD.create(name: "vu-dirty-log", size: size)
    }
    /// The marked pages' addresses, cleared (as QEMU syncs and clears the log).
    func collect() -> Set<UInt64> {
        var bytes = [UInt8](repeating: 0, count: size)
        _ = pread(fd.rawValue, &bytes, size, 0)
        _ = pwrite(fd.rawValue, [UInt8](repeating: 0, count: size), size, 0)
        var pages = Set<UInt64>()
        for (index, byte) in bytes.enumerated() where byte != 0 {
            for bit in 0..<8 where byte & (1 << bit) != 0 { pages.insert(UInt64(index * 8 + bit) * 4096) }
        }
        return pages
    }
}

private func pages(_ address: UInt64, _ length: UInt64) -> Set<UInt64> {
    Set(stride(from: address / 4096 * 4096, through: (address + length - 1) / 4096 * 4096, by: 4096))
}

@Suite("vhost-user: dirty logging for live migration (LOG_SHMFD, LOG_ALL, logged used rings)")
struct VhostUserMigrationTests {
    static let logAll: UInt64 = 1 << 26

    @Test("Logging as QEMU starts it: received frames and both used rings are marked in the shared log; switched off by SET_FEATURES, nothing is; no frame lost at either switch")
    func dirtyLoggingAsQEMUDoesIt() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let frontend = try served.connect()
        let memory = try SimulatedGuestMemory()
        let guest = try frontend.negotiate(memory: memory)
        #expect(try frontend.getFeatures() & Self.logAll != 0, "VHOST_F_LOG_ALL offered")
        #expect(roundTrip(guest, sizes: [60, 1514]))

        // Migration starts: LOG_ALL, the log (answered), and each ring's used-ring log address.
        let log = try SharedLog(covering: memory.end)
        try frontend.setFeatures(guest.features | Self.logAll)
        let reply = frontend.exchange(Frontend.Request.setLogBase.rawValue, payload: LE.u64(UInt64(log.size)) + LE.u64(0), fds: [log.fd.rawValue])
        guard case .reply(let answer) = reply else { Issue.record("SET_LOG_BASE: \(reply)"); return }
        #expect(answer.request == Frontend.Request.setLogBase.rawValue && answer.u64 == 0)
        for ring in 0..<2 {
            guard case let .frontendVirtual(table, available, used) = guest.queues[ring].frontendRings else { return }
            try frontend.setVringAddr(UInt32(ring), descriptorTable: table, usedRing: used, availableRing: available,
                                      flags: 1, log: guest.queues[ring].usedRing.rawValue)
        }
        // The address changes stopped and restarted the rings where they were: traffic goes on.
        guest.kick(0, since: 0, always: true)
        guest.kick(1, since: 0, always: true)
        _ = log.collect()
        #expect(roundTrip(guest, sizes: [1000]))
        let rx = guest.receiveQueue(0), tx = guest.transmitQueue(0)
        let marked = log.collect()
        #expect(marked.isSuperset(of: pages(rx.usedRing.rawValue, UInt64(6 + 8 * rx.size))), "RX used ring")
        #expect(marked.isSuperset(of: pages(tx.usedRing.rawValue, UInt64(6 + 8 * tx.size))), "TX used ring")
        #expect(marked.count > pages(rx.usedRing.rawValue, UInt64(6 + 8 * rx.size)).count + 1, "the received frame's buffer too")
        #expect(served.device.isLoggingDirtyPages)

        // Migration cancelled: LOG_ALL cleared. Nothing more is marked; traffic never stopped.
        try frontend.setFeatures(guest.features)
        #expect(!served.device.isLoggingDirtyPages)
        _ = log.collect()
        #expect(roundTrip(guest, sizes: [60, 700, 1514], seed: 3))
        #expect(log.collect().isEmpty)
    }
}
