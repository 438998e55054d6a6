#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim
import Synchronization
import Sys

/// A Linux TAP interface opened with one file descriptor per queue pair.
///
/// Frames read from and written to the TAP start with the 12-byte virtio_net_hdr_v1 (the TAP's vnet
/// header), so a virtio-net data path can hand guest buffers to the kernel as they are. The
/// descriptors are non-blocking and close-on-exec; they close when the device is released, which also
/// removes a non-persistent TAP from the system.
///
/// The TAP lives in the network namespace of the thread that called ``open(name:queuePairs:vnetHeaderSize:)``;
/// the link settings (``setMTU(_:)``, ``setLinkUp(_:)``) act there too, whichever thread calls them.
///
/// Concurrency: ``read(queue:into:)`` and ``write(queue:iovecs:)`` take no lock and may run on one
/// worker per queue; configuration calls are serialised internally and may come from any thread.
public final class TapDevice: Sendable {
    /// The tun driver's limit on queues per device (MAX_TAP_QUEUES).
    public static let maximumQueuePairs = 256

    /// The interface name the kernel uses (differs from the requested one for templates like "tap%d").
    public let name: String
    /// True if the interface did not exist before ``open(name:queuePairs:vnetHeaderSize:)`` created it.
    public let createdByUs: Bool
    /// True if the TAP was opened with IFF_MULTI_QUEUE (asked for, or an existing multi_queue TAP).
    public let isMultiQueue: Bool
    /// The vnet header length set with TUNSETVNETHDRSZ.
    public var vnetHeaderSize: Int32 { state.withLock { $0.vnetHeaderSize } }
    /// How many queue file descriptors the device holds (one per queue pair).
    public var queueCount: Int { queues.count }
    /// Every descriptor the device holds: its queues and the socket for interface ioctls.
    /// Descriptors held now: one per queue, the control socket, and an io_uring per queue that wrote a burst.
    public var descriptorCount: Int { queues.count + 1 + writers.filter(\.hasRing).count }

    private let queues: [Descriptor]
    /// One per queue, used by that queue's worker only.
    private let writers: [BurstWriter]
    /// A datagram socket opened in the TAP's network namespace, for the interface ioctls: a socket
    /// opened later by another thread could sit in a different namespace and find another interface.
    private let control: Descriptor
    private let state: Mutex<State>

    private struct State {
        /// What TUNSETOFFLOAD last set; the kernel cannot be asked.
        var offloads: TapOffloads
        /// Per queue: attached (true) or detached with TUNSETQUEUE.
        var enabled: [Bool]
        var vnetHeaderSize: Int32
    }

    private init(
        name: String, createdByUs: Bool, isMultiQueue: Bool, vnetHeaderSize: Int32,
        queues: [Descriptor], control: Descriptor
    ) {
        self.name = name
        self.createdByUs = createdByUs
        self.isMultiQueue = isMultiQueue
        self.queues = queues
        self.writers = queues.map { BurstWriter(fd: $0.rawValue) }
        self.control = control
        self.state = Mutex(State(offloads: [], enabled: Array(repeating: true, count: queues.count), vnetHeaderSize: vnetHeaderSize))
    }

    // MARK: Opening

    /// Creates the TAP `name` if no interface has that name, or attaches to the existing TAP (for
    /// example a persistent one made with `ip tuntap add NAME mode tap multi_queue vnet_hdr`).
    ///
    /// Opens `queuePairs` descriptors with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, plus IFF_MULTI_QUEUE when
    /// `queuePairs > 1` or when the existing TAP is multi_queue. Sets the vnet header size on each and
    /// turns all offloads off, so frames read carry no GSO or partial checksums until
    /// ``setOffloads(_:)`` allows them.
    ///
    /// - Parameters:
    ///   - name: 1 to 15 bytes; may be a kernel template such as "tap%d" for a new TAP.
    ///   - queuePairs: 1...``maximumQueuePairs``.
    ///   - vnetHeaderSize: 12 for virtio_net_hdr_v1 (also the legacy header with mergeable buffers).
    public static func open(name: String, queuePairs: Int = 1, vnetHeaderSize: Int32 = 12) throws(TapError) -> TapDevice {
        try validate(name: name)
        guard queuePairs >= 1, queuePairs <= maximumQueuePairs else {
            throw .invalidQueueCount(device: name, queuePairs)
        }
        let control = try openControlSocket(device: name)
        var exists = try interfaceExists(name, control: control.rawValue)

        let first = try openTunFile(device: name)
        var features: UInt32 = 0
        _ = try call(name, "ioctl(TUNGETFEATURES)") { cvs_tap_get_features(first.rawValue, &features) }
        let wantsMultiQueue = queuePairs > 1
        if wantsMultiQueue && features & UInt32(truncatingIfNeeded: CVS_IFF_MULTI_QUEUE) == 0 {
            throw .multiQueueNotSupported(device: name, existingSingleQueue: false)
        }

        let base = CVS_IFF_TAP | CVS_IFF_NO_PI | CVS_IFF_VNET_HDR
        var actualName = name
        var created = false
        var multiQueue = wantsMultiQueue
        if !exists {
            // IFF_TUN_EXCL makes creation exclusive: if someone else made the name meanwhile we get
            // EBUSY and attach instead, so `createdByUs` stays true to what happened.
            let flags = base | (wantsMultiQueue ? CVS_IFF_MULTI_QUEUE : 0) | CVS_IFF_TUN_EXCL
            switch setInterface(first.rawValue, name: name, flags: flags) {
            case .success(let kernelName):
                actualName = kernelName
                created = true
            case .failure(let error) where error.errno.rawValue == EBUSY:
                exists = true
            case .failure(let error):
                throw classify(error, device: name)
            }
        }
        if exists {
            (actualName, multiQueue) = try attach(first.rawValue, name: name, flags: base, multiQueue: wantsMultiQueue)
        }
        try checkFlags(first.rawValue, device: actualName)

        var queues = [Descriptor(first)]
        queues.reserveCapacity(queuePairs)
        for _ in 1..<queuePairs {
            let next = try openTunFile(device: actualName)
            switch setInterface(next.rawValue, name: actualName, flags: base | CVS_IFF_MULTI_QUEUE) {
            case .success: break
            case .failure(let error): throw classify(error, device: actualName)
            }
            queues.append(Descriptor(next))
        }
        for queue in queues {
            _ = try call(actualName, "ioctl(TUNSETVNETHDRSZ)") {
                cvs_tap_set_vnet_hdr_size(queue.rawValue, vnetHeaderSize)
            }
        }
        // An existing TAP keeps the offloads its last user set; start from none so nothing reaches a
        // guest that has not negotiated it.
        _ = try call(actualName, "ioctl(TUNSETOFFLOAD)") { cvs_tap_set_offload(queues[0].rawValue, 0) }

        return TapDevice(
            name: actualName, createdByUs: created, isMultiQueue: multiQueue, vnetHeaderSize: vnetHeaderSize,
            queues: queues, control: control)
    }

    /// Removes a persistent TAP (TUNSETPERSIST 0). The interface disappears once every descriptor
    /// attached to it, including other processes' ones, is closed. Works by attaching, so a single-queue
    /// TAP someone holds open is ``TapError/busy(device:_:)``.
    ///
    /// - Returns: false if no interface had the name.
    @discardableResult
    public static func delete(name: String) throws(TapError) -> Bool {
        try validate(name: name)
        let control = try openControlSocket(device: name)
        guard try interfaceExists(name, control: control.rawValue) else { return false }
        let file = try openTunFile(device: name)
        // No IFF_VNET_HDR: this descriptor never carries frames.
        _ = try attach(file.rawValue, name: name, flags: CVS_IFF_TAP | CVS_IFF_NO_PI, multiQueue: false)
        _ = try call(name, "ioctl(TUNSETPERSIST)") { cvs_tap_set_persist(file.rawValue, 0) }
        return true
    }

    /// A one-queue device over a descriptor that stands in for a TAP's queue (a socket, say), for
    /// tests of what sits above it: reads, writes and bursts go to it; interface settings fail.
    package static func standIn(name: String, queue: consuming OwnedFileDescriptor) throws(TapError) -> TapDevice {
        let control = try openControlSocket(device: name)
        return TapDevice(name: name, createdByUs: false, isMultiQueue: false, vnetHeaderSize: 12,
                         queues: [Descriptor(queue)], control: control)
    }

    /// Whether the interface is gone (someone deleted it): the device's descriptors are then attached
    /// to no interface, and TUNGETIFF answers EBADFD. A new TAP of the same name is another device.
    public var isGone: Bool {
        var flags: Int32 = 0
        return cvs_tap_get_iff(queues[0].rawValue, nil, &flags) < 0 && errno == EBADFD
    }

    // MARK: Queues

    /// The non-blocking descriptor of `queue` (0..<``queueCount``), for epoll. Owned by the device.
    public func fd(queue: Int) -> Int32 {
        queues[queue].rawValue
    }

    /// Attaches (true) or detaches (false) `queue` with TUNSETQUEUE: a detached queue receives no
    /// frames from the kernel. Only multi-queue TAPs can detach; asking for the current state is a no-op.
    public func setQueueEnabled(_ queue: Int, _ enabled: Bool) throws(TapError) {
        guard queues.indices.contains(queue) else { throw .invalidQueue(device: name, queue: queue) }
        let fd = queues[queue].rawValue
        try state.withLock { (state: inout State) throws(TapError) in
            // The kernel answers EINVAL to attaching an attached queue (or detaching a detached one).
            if state.enabled[queue] == enabled { return }
            let flags = enabled ? CVS_IFF_ATTACH_QUEUE : CVS_IFF_DETACH_QUEUE
            _ = try Self.call(name, "ioctl(TUNSETQUEUE)") { cvs_tap_set_queue(fd, flags) }
            state.enabled[queue] = enabled
        }
    }

    /// Whether `queue` is attached (see ``setQueueEnabled(_:_:)``).
    public func isQueueEnabled(_ queue: Int) -> Bool {
        state.withLock { queues.indices.contains(queue) && $0.enabled[queue] }
    }

    /// Sets the vnet header length on every queue (TUNSETVNETHDRSZ): 12 for virtio 1.x and for legacy
    /// drivers with mergeable buffers, 10 for other legacy drivers.
    public func setVnetHeaderSize(_ size: Int32) throws(TapError) {
        try state.withLock { (state: inout State) throws(TapError) in
            if state.vnetHeaderSize == size { return }
            for queue in queues {
                _ = try Self.call(name, "ioctl(TUNSETVNETHDRSZ)") { cvs_tap_set_vnet_hdr_size(queue.rawValue, size) }
            }
            state.vnetHeaderSize = size
        }
    }

    // MARK: Offloads

    /// The offloads last set with ``setOffloads(_:)`` (none right after opening).
    public var offloads: TapOffloads {
        state.withLock { $0.offloads }
    }

    /// Lets the kernel hand this TAP's reader frames with these offloads (TUNSETOFFLOAD). Every offload
    /// but `csum` needs `csum`; the kernel refuses other combinations with EINVAL.
    public func setOffloads(_ offloads: TapOffloads) throws(TapError) {
        let fd = offloadFD
        try state.withLock { (state: inout State) throws(TapError) in
            if state.offloads == offloads { return }
            _ = try Self.call(name, "ioctl(TUNSETOFFLOAD)") { cvs_tap_set_offload(fd, offloads.rawValue) }
            state.offloads = offloads
        }
    }

    /// Which offloads this kernel accepts, found by trying TUNSETOFFLOAD with each (on top of `csum`,
    /// which they all need), then setting back what was set before.
    ///
    /// The kernel refuses unknown bits with EINVAL, so new offloads show up here only on kernels that
    /// have them (USO needs Linux 6.2, which takes USO4 and USO6 only together).
    public func probeOffloads() -> TapOffloads {
        let fd = offloadFD
        return state.withLock { (state: inout State) -> TapOffloads in
            func accepts(_ offloads: TapOffloads) -> Bool {
                (try? retryingOnInterrupt("ioctl(TUNSETOFFLOAD)") { cvs_tap_set_offload(fd, offloads.rawValue) }) != nil
            }
            var accepted: TapOffloads = []
            if accepts(.csum) {
                accepted = .csum
                for single: TapOffloads in [.tso4, .tso6, .ufo] where accepts([.csum, single]) {
                    accepted.insert(single)
                }
                let tso = accepted.intersection([.tso4, .tso6])
                if !tso.isEmpty && accepts(tso.union([.csum, .tsoECN])) {
                    accepted.insert(.tsoECN)
                }
                if accepts([.csum, .uso4, .uso6]) {
                    accepted.formUnion([.uso4, .uso6])
                } else {
                    for single: TapOffloads in [.uso4, .uso6] where accepts([.csum, single]) {
                        accepted.insert(single)
                    }
                }
                // Each was accepted next to csum; drop the least important until the whole set is.
                for optional: TapOffloads in [.uso6, .uso4, .ufo, .tsoECN, .tso6, .tso4] where !accepts(accepted) {
                    accepted.remove(optional)
                }
            }
            // Restoring a set the kernel accepted before cannot fail for a reason we could act on.
            _ = accepts(state.offloads)
            return accepted
        }
    }

    /// Offloads are a device setting (not per queue), so one descriptor is enough.
    private var offloadFD: Int32 { queues[0].rawValue }

    // MARK: Link settings

    /// Sets the interface MTU (SIOCSIFMTU).
    public func setMTU(_ mtu: Int) throws(TapError) {
        guard let value = Int32(exactly: mtu) else {
            throw .system(device: name, SystemError(call: "ioctl(SIOCSIFMTU)", code: EINVAL))
        }
        _ = try Self.call(name, "ioctl(SIOCSIFMTU)") { cvs_if_set_mtu(control.rawValue, name, value) }
    }

    /// The interface MTU (SIOCGIFMTU).
    public func mtu() throws(TapError) -> Int {
        var value: Int32 = 0
        _ = try Self.call(name, "ioctl(SIOCGIFMTU)") { cvs_if_get_mtu(control.rawValue, name, &value) }
        return Int(value)
    }

    /// Brings the interface up or down (IFF_UP via SIOCGIFFLAGS / SIOCSIFFLAGS).
    public func setLinkUp(_ up: Bool) throws(TapError) {
        let flags = try interfaceFlags()
        let wanted = up ? flags | CVS_IFF_UP : flags & ~CVS_IFF_UP
        if wanted == flags { return }
        _ = try Self.call(name, "ioctl(SIOCSIFFLAGS)") { cvs_if_set_flags(control.rawValue, name, wanted) }
    }

    /// Whether the interface is administratively up (IFF_UP).
    public func isLinkUp() throws(TapError) -> Bool {
        try interfaceFlags() & CVS_IFF_UP != 0
    }

    private func interfaceFlags() throws(TapError) -> Int32 {
        var flags: Int32 = 0
        _ = try Self.call(name, "ioctl(SIOCGIFFLAGS)") { cvs_if_get_flags(control.rawValue, name, &flags) }
        return flags
    }

    // MARK: Data path

    /// Writes one frame (vnet header first) gathered from `iovecs` to `queue` with writev.
    ///
    /// - Returns: the bytes written, or nil if the queue is full (EAGAIN): wait until ``fd(queue:)`` is
    ///   writable. Errors carry the errno and concern this frame only: EINVAL for a vnet header the
    ///   kernel rejects (such as a checksum start beyond the frame) or a frame shorter than an Ethernet
    ///   header, EIO while the link is down.
    public func write(queue: Int, iovecs: UnsafeBufferPointer<iovec>) throws(TapError) -> Int? {
        guard queue >= 0, queue < queues.count else { throw .invalidQueue(device: name, queue: queue) }
        guard let count = Int32(exactly: iovecs.count) else {
            throw .system(device: name, SystemError(call: "writev", code: EINVAL))
        }
        let fd = queues[queue].rawValue
        do throws(SystemError) {
            return try retryingOnInterruptUnlessWouldBlock("writev") { Glibc.writev(fd, iovecs.baseAddress, count) }
        } catch {
            throw .system(device: name, error)
        }
    }

    /// Writes a burst of frames to `queue`, in order, in as few system calls as the kernel allows (see
    /// ``BurstWriter``), reporting each attempted frame's result: the bytes written or -errno. Stops at
    /// the first frame that fails (-EAGAIN: the queue is full; wait until ``fd(queue:)`` is writable).
    /// Returns how many frames were attempted.
    public func write(queue: Int, frames: UnsafeBufferPointer<FrameSlice>, report: (_ index: Int, _ result: Int) -> Void) -> Int {
        writers[queue].write(frames, report: report)
    }

    /// Reads one frame (vnet header first) from `queue` into `iovecs` with readv.
    ///
    /// The TAP fills the 10-byte virtio_net_hdr; num_buffers (the last two bytes of a 12-byte header) is
    /// the reader's to set: Linux 6.18 writes zeros there, older kernels leave the bytes untouched.
    ///
    /// The kernel truncates silently: a frame longer than the buffers fills them and its rest is lost,
    /// so a result equal to the buffers' total length may be a cut frame (offer 12 + 65550 bytes to be
    /// safe with GSO). Buffers shorter than the vnet header fail with EINVAL and drop the frame.
    ///
    /// - Returns: the bytes read, or nil if no frame is waiting (EAGAIN): wait until ``fd(queue:)`` is
    ///   readable.
    public func read(queue: Int, into iovecs: UnsafeBufferPointer<iovec>) throws(TapError) -> Int? {
        guard queue >= 0, queue < queues.count else { throw .invalidQueue(device: name, queue: queue) }
        guard let count = Int32(exactly: iovecs.count) else {
            throw .system(device: name, SystemError(call: "readv", code: EINVAL))
        }
        let fd = queues[queue].rawValue
        do throws(SystemError) {
            return try retryingOnInterruptUnlessWouldBlock("readv") { Glibc.readv(fd, iovecs.baseAddress, count) }
        } catch {
            throw .system(device: name, error)
        }
    }
}

// MARK: - Helpers

/// Owns one descriptor; a class because arrays cannot hold ~Copyable values.
private final class Descriptor: Sendable {
    private let owned: OwnedFileDescriptor
    var rawValue: Int32 { owned.rawValue }
    init(_ owned: consuming OwnedFileDescriptor) { self.owned = owned }
}

extension TapDevice {
    /// The kernel's dev_valid_name rules, checked up front so a bad name never reaches an ioctl.
    /// Checks a TAP name against the kernel's rules (dev_valid_name): 1 to 15 bytes, not "." or "..",
    /// no NUL, '/', ':' or whitespace. The one place that says so.
    public static func validate(name: String) throws(TapError) {
        let bytes = Array(name.utf8)
        let maximum = Int(CVS_IFNAMSIZ) - 1
        guard !bytes.isEmpty, bytes.count <= maximum, name != ".", name != ".." else {
            throw .invalidName(name)
        }
        // NUL would truncate the name in C; '/' and ':' and whitespace are refused by the kernel.
        let forbidden: Set<UInt8> = [0, UInt8(ascii: "/"), UInt8(ascii: ":"), UInt8(ascii: " "),
                                     0x09, 0x0A, 0x0B, 0x0C, 0x0D]
        guard !bytes.contains(where: forbidden.contains) else { throw .invalidName(name) }
    }

    /// Runs one call returning -1/errno through Sys's EINTR retry and types its error for `device`.
    fileprivate static func call<R: FixedWidthInteger>(
        _ device: String, _ callName: String, _ body: () -> R
    ) throws(TapError) -> R {
        do throws(SystemError) {
            return try retryingOnInterrupt(callName, body)
        } catch {
            throw classify(error, device: device)
        }
    }

    fileprivate static func classify(_ error: SystemError, device: String) -> TapError {
        switch error.errno.rawValue {
        case EPERM, EACCES: .permissionDenied(device: device, error)
        default: .system(device: device, error)
        }
    }

    fileprivate static func openTunFile(device: String) throws(TapError) -> OwnedFileDescriptor {
        let fd = try call(device, "open(/dev/net/tun)") {
            Glibc.open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK)
        }
        return OwnedFileDescriptor(taking: fd)
    }

    fileprivate static func openControlSocket(device: String) throws(TapError) -> Descriptor {
        // AF_UNIX: interface ioctls work on any socket family, and this one exists even without IPv4.
        let type = Int32(bitPattern: SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue)
        let fd = try call(device, "socket(AF_UNIX, SOCK_DGRAM)") { socket(AF_UNIX, type, 0) }
        return Descriptor(OwnedFileDescriptor(taking: fd))
    }

    /// Whether any interface (TAP or not) has this name in the calling thread's namespace.
    /// Not /sys/class/net: sysfs shows the namespace it was mounted in, not the thread's.
    fileprivate static func interfaceExists(_ name: String, control: Int32) throws(TapError) -> Bool {
        var index: Int32 = 0
        do throws(SystemError) {
            _ = try retryingOnInterrupt("ioctl(SIOCGIFINDEX)") { cvs_if_get_index(control, name, &index) }
            return true
        } catch where error.errno.rawValue == ENODEV {
            return false
        } catch {
            throw classify(error, device: name)
        }
    }

    /// TUNSETIFF; the kernel's name for the interface on success.
    fileprivate static func setInterface(_ fd: Int32, name: String, flags: Int32) -> Result<String, SystemError> {
        var buffer = [CChar](repeating: 0, count: Int(CVS_IFNAMSIZ))
        do throws(SystemError) {
            _ = try retryingOnInterrupt("ioctl(TUNSETIFF)") { cvs_tap_set_iff(fd, name, flags, &buffer) }
        } catch {
            return .failure(error)
        }
        let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
        return .success(String(decoding: bytes, as: UTF8.self))
    }

    /// Attaches `fd` to the existing interface `name`; returns the kernel's name and whether the TAP is
    /// multi-queue. Asking for one queue (`multiQueue` false) also accepts a multi_queue TAP.
    ///
    /// TUNSETIFF answers EINVAL both when the interface is not a TAP and when IFF_MULTI_QUEUE differs
    /// from the TAP's own; trying the other multi-queue setting tells the two apart.
    fileprivate static func attach(
        _ fd: Int32, name: String, flags: Int32, multiQueue: Bool
    ) throws(TapError) -> (name: String, multiQueue: Bool) {
        let first = setInterface(fd, name: name, flags: flags | (multiQueue ? CVS_IFF_MULTI_QUEUE : 0))
        switch first {
        case .success(let kernelName):
            return (kernelName, multiQueue)
        case .failure(let error) where error.errno.rawValue == EINVAL:
            switch setInterface(fd, name: name, flags: flags | (multiQueue ? 0 : CVS_IFF_MULTI_QUEUE)) {
            case .success(let kernelName):
                // A single-queue TAP cannot serve several queues; `fd` closes with the caller's owner.
                if multiQueue {
                    throw .multiQueueNotSupported(device: name, existingSingleQueue: true)
                }
                return (kernelName, !multiQueue)
            case .failure(let second) where second.errno.rawValue == EINVAL:
                throw .nameInUseByNonTap(device: name, error)
            case .failure(let second):
                throw attachError(second, device: name)
            }
        case .failure(let error):
            throw attachError(error, device: name)
        }
    }

    private static func attachError(_ error: SystemError, device: String) -> TapError {
        error.errno.rawValue == EBUSY ? .busy(device: device, error) : classify(error, device: device)
    }

    /// The flags a TAP keeps are its first attacher's: check they suit a virtio-net data path.
    fileprivate static func checkFlags(_ fd: Int32, device: String) throws(TapError) {
        var flags: Int32 = 0
        _ = try call(device, "ioctl(TUNGETIFF)") { cvs_tap_get_iff(fd, nil, &flags) }
        let needed = CVS_IFF_TAP | CVS_IFF_VNET_HDR
        if flags & needed != needed || flags & CVS_IFF_NO_PI == 0 {
            throw .incompatibleFlags(device: device, flags: flags)
        }
    }
}
