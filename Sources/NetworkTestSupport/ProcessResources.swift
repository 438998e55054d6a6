import Foundation
import Glibc

/// What the test process holds, read from /proc/self: threads (by id and name), their CPU time, and
/// open file descriptors with enough identity to tell a closed-and-reused number from a leaked one.
public enum ProcessResources {
    /// Thread ids of the process with their names (/proc/self/task/TID/comm).
    public static func threads() -> [Int32: String] {
        var result: [Int32: String] = [:]
        for entry in directoryEntries("/proc/self/task") {
            guard let tid = Int32(entry), let comm = readFile("/proc/self/task/\(entry)/comm") else { continue }
            result[tid] = comm.trimmingCharacters(in: .newlines)
        }
        return result
    }

    /// Ids of the threads called `name` (the kernel keeps 15 bytes of a name).
    public static func threads(named name: String) -> [Int32] {
        threads().filter { $0.value == name }.map(\.key).sorted()
    }

    public static var threadCount: Int { directoryEntries("/proc/self/task").count }

    /// User plus system CPU time of thread `tid` (/proc/self/task/TID/stat utime + stime, in clock
    /// ticks of 1/sysconf(_SC_CLK_TCK) s, usually 10 ms); nil once the thread is gone.
    public static func cpuTime(thread tid: Int32) -> Duration? {
        cpuTime(statPath: "/proc/self/task/\(tid)/stat")
    }

    private static func cpuTime(statPath: String) -> Duration? {
        guard let stat = readFile(statPath),
              let close = stat.lastIndex(of: ")") else { return nil }
        // After "pid (comm)" come the fields from 3 (state) on; utime and stime are fields 14 and 15.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        guard fields.count > 12, let user = Int64(fields[11]), let system = Int64(fields[12]) else { return nil }
        let ticksPerSecond = Int64(sysconf(Int32(_SC_CLK_TCK)))
        guard ticksPerSecond > 0 else { return nil }
        return .milliseconds((user + system) * 1000 / ticksPerSecond)
    }

    /// Whether thread `tid` of this process still exists.
    public static func threadExists(_ tid: Int32) -> Bool {
        access("/proc/self/task/\(tid)", F_OK) == 0
    }

    /// Threads blocked in epoll_wait (or epoll_pwait/epoll_pwait2) on the epoll descriptor `epoll`,
    /// from /proc/self/task/TID/syscall: "NUMBER ARG0 ...", with the epoll fd as the first argument.
    public static func threads(waitingOnEpoll epoll: Int32) -> [Int32] {
        #if arch(x86_64)
        let waits: Set<String> = ["232", "281", "441"]  // epoll_wait, epoll_pwait, epoll_pwait2
        #else
        let waits: Set<String> = ["22", "441"]  // aarch64: epoll_pwait, epoll_pwait2
        #endif
        return threads().keys.filter { tid in
            guard let line = readFile("/proc/self/task/\(tid)/syscall") else { return false }
            let words = line.split(whereSeparator: \.isWhitespace)
            guard words.count >= 2, waits.contains(String(words[0])),
                  let argument = UInt64(words[1].dropFirst(2), radix: 16) else { return false }
            return argument == UInt64(epoll)
        }.sorted()
    }

    /// CPU time of the calling thread (/proc/thread-self/stat), for a positive control.
    public static func cpuTimeOfCurrentThread() -> Duration? {
        cpuTime(statPath: "/proc/thread-self/stat")
    }

    // MARK: File descriptors

    /// One open descriptor as /proc/self/fd and /proc/self/fdinfo describe it.
    public struct OpenFile: Sendable, Hashable, CustomStringConvertible {
        /// The link target: a path, "socket:[INODE]", "anon_inode:[eventfd]", ...
        public var target: String
        /// The target plus what tells two files with the same target apart: the inode, eventfd-id,
        /// the interface of a TAP (iff), the descriptors an epoll watches. Stays the same for as long
        /// as that open file lives, so a number now naming a different file has a different identity.
        public var identity: String
        /// For an epoll: the descriptors it watches.
        public var watches: [Int32]
        public var description: String { identity }
        public var isEpoll: Bool { target == "anon_inode:[eventpoll]" }
        public var isSocket: Bool { target.hasPrefix("socket:") }
    }

    /// Open descriptors of the process.
    public static func descriptors() -> [Int32: OpenFile] {
        guard let directory = opendir("/proc/self/fd") else { return [:] }
        defer { closedir(directory) }
        let own = dirfd(directory)
        var names: [Int32] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if let fd = Int32(name), fd != own { names.append(fd) }
        }
        var result: [Int32: OpenFile] = [:]
        for fd in names {
            guard let target = linkTarget("/proc/self/fd/\(fd)") else { continue }
            var identity = [target]
            var watches: [Int32] = []
            for line in (readFile("/proc/self/fdinfo/\(fd)") ?? "").split(separator: "\n") {
                if line.hasPrefix("ino:") || line.hasPrefix("eventfd-id:") || line.hasPrefix("iff:") {
                    identity.append(line.split(whereSeparator: \.isWhitespace).joined(separator: " "))
                } else if line.hasPrefix("tfd:") {
                    // "tfd: N events: E data: D ...": the events change with the worker's interest.
                    let words = line.split(whereSeparator: \.isWhitespace)
                    if words.count >= 6, let watched = Int32(words[1]) {
                        identity.append("tfd \(watched) data \(words[5])")
                        watches.append(watched)
                    }
                }
            }
            result[fd] = OpenFile(target: target, identity: identity.joined(separator: " | "), watches: watches)
        }
        return result
    }

    public static var descriptorCount: Int { directoryEntries("/proc/self/fd").count }

    /// Descriptors of `now` that were not open (as that same file) in `before`.
    public static func opened(since before: [Int32: OpenFile], now: [Int32: OpenFile]) -> [Int32: OpenFile] {
        now.filter { before[$0.key]?.identity != $0.value.identity }
    }

    /// Which of `descriptors` (from an earlier snapshot) are still open as the same file.
    public static func stillOpen(_ descriptors: [Int32: OpenFile]) -> [Int32: OpenFile] {
        let now = self.descriptors()
        return descriptors.filter { now[$0.key]?.identity == $0.value.identity }
    }

    /// The inode of the network namespace socket `fd` belongs to (ioctl SIOCGSKNS), to compare with
    /// ``inode(of:)`` of /run/netns/NAME.
    public static func networkNamespaceInode(ofSocket fd: Int32) -> UInt64? {
        let namespace = ioctl(fd, UInt(0x894C))  // SIOCGSKNS: opens the socket's network namespace
        guard namespace >= 0 else { return nil }
        defer { close(namespace) }
        var status = stat()
        guard fstat(namespace, &status) == 0 else { return nil }
        return UInt64(status.st_ino)
    }

    public static func inode(of path: String) -> UInt64? {
        var status = stat()
        guard stat(path, &status) == 0 else { return nil }
        return UInt64(status.st_ino)
    }

    // MARK: Reading /proc

    static func directoryEntries(_ path: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).filter { !$0.hasPrefix(".") }
    }

    static func readFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var data: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count > 0 else { break }
            data += buffer.prefix(count)
        }
        return String(decoding: data, as: UTF8.self)
    }

    static func linkTarget(_ path: String) -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        let count = readlink(path, &buffer, buffer.count - 1)
        guard count >= 0 else { return nil }
        return String(decoding: buffer.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
