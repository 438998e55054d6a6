#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Sys
import Testing
import VhostUser
import VirtioNet
import VirtioNetTestSupport

/// Bytes of this process's mappings of the memfd called `name` (/proc/self/maps).
private func mappedBytes(ofMemFD name: String) -> UInt64 {
    guard let maps = readProcFile("/proc/self/maps") else { return 0 }
    var total: UInt64 = 0
    for line in maps.split(separator: "\n") where line.contains("/memfd:\(name) ") || line.hasSuffix("/memfd:\(name)") {
        let range = line.prefix { $0 != " " }.split(separator: "-")
        if range.count == 2, let start = UInt64(range[0], radix: 16), let end = UInt64(range[1], radix: 16) { total += end - start }
    }
    return total
}

@Suite("vhost-user: what a frontend's memory may cost the process")
struct GuestMemoryLimitTests {
    @Test("A region deep inside a huge sparse memfd maps only the bytes it covers")
    func regionMapsOnlyWhatItCovers() throws {
        let served = try ServedDevice()
        defer { served.stop() }
        let context = try CaseContext(served: served, setup: .acked)
        let probe = try context.probe(size: 4096)
        #expect(ftruncate(probe.rawValue, off_t(1) << 46) == 0)  // 64 TiB, sparse
        let region = Frontend.Region(guestAddress: 0x10_0000, size: 4 << 20, userAddress: 0x7e00_0010_0000, mmapOffset: (1 << 45) + 4096)
        #expect(isSuccessAck(context.send(.setMemTable, payload: Frontend.memTablePayload([region]), fds: [probe.rawValue])))
        let mapped = mappedBytes(ofMemFD: probe.name)
        #expect(mapped > 0 && mapped <= (4 << 20) + 4096, "mapped \(mapped) bytes for a 4 MiB region")
        context.frontend.close()
    }

    @Test("Guest memory up to the device's limit is mapped; one page more is refused (SET_MEM_TABLE and ADD_MEM_REG)",
          arguments: [64 << 20, VhostUserBackend.defaultMemoryLimit] as [UInt64])
    func memoryLimitAtItsEdge(limit: UInt64) throws {
        let served = try ServedDevice(memoryLimit: limit)
        defer { served.stop() }
        let context = try CaseContext(served: served, setup: .acked)
        let probe = try context.probe(size: 4096)
        #expect(ftruncate(probe.rawValue, off_t(limit + (8 << 20))) == 0)  // sparse
        let user: UInt64 = 0x7000_0000_0000
        let atLimit = Frontend.Region(guestAddress: 0, size: limit, userAddress: user)
        let overLimit = Frontend.Region(guestAddress: 0, size: limit + 4096, userAddress: user)
        #expect(isErrorAck(context.send(.setMemTable, payload: Frontend.memTablePayload([overLimit]), fds: [probe.rawValue])), "one page over")
        #expect(isSuccessAck(context.send(.setMemTable, payload: Frontend.memTablePayload([atLimit]), fds: [probe.rawValue])), "exactly the limit")
        // A further region of one page passes the limit.
        let extra = Frontend.Region(guestAddress: limit + (1 << 30), size: 4096, userAddress: user + limit + (1 << 30), mmapOffset: limit)
        #expect(isErrorAck(context.send(.addMemReg, payload: LE.u64(0) + extra.bytes, fds: [probe.rawValue])), "ADD_MEM_REG past the limit")
        context.frontend.close()
    }
}
