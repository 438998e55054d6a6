import Sys

/// Why a TAP operation failed. Every case names the device it concerns.
public enum TapError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The name is empty, longer than 15 bytes (IFNAMSIZ - 1), or holds characters the kernel refuses
    /// in interface names. Checked before any system call.
    case invalidName(String)
    /// `queuePairs` is outside 1...``TapDevice/maximumQueuePairs``.
    case invalidQueueCount(device: String, Int)
    /// A queue index outside `0..<queueCount` was passed in.
    case invalidQueue(device: String, queue: Int)
    /// EPERM/EACCES: the process lacks CAP_NET_ADMIN, or does not own the persistent TAP.
    case permissionDenied(device: String, SystemError)
    /// An interface with this name exists but is not a TAP (a dummy, veth, bridge, TUN, ...).
    case nameInUseByNonTap(device: String, SystemError)
    /// A single-queue TAP with this name is already attached by someone else.
    case busy(device: String, SystemError)
    /// More than one queue was asked for, but the kernel's tun driver lacks IFF_MULTI_QUEUE
    /// (`existingSingleQueue` false), or the TAP exists without multi_queue (`existingSingleQueue` true).
    case multiQueueNotSupported(device: String, existingSingleQueue: Bool)
    /// The TAP was attached, but the kernel kept flags this backend cannot work with: another process
    /// holds queues of the same multi-queue TAP opened without IFF_VNET_HDR or with packet info.
    case incompatibleFlags(device: String, flags: Int32)
    /// Any other failed system call.
    case system(device: String, SystemError)

    /// The interface the error concerns.
    public var device: String {
        switch self {
        case .invalidName(let name): name
        case .invalidQueueCount(let device, _), .invalidQueue(let device, _),
             .permissionDenied(let device, _), .nameInUseByNonTap(let device, _), .busy(let device, _),
             .multiQueueNotSupported(let device, _), .incompatibleFlags(let device, _),
             .system(let device, _):
            device
        }
    }

    public var description: String {
        switch self {
        case .invalidName(let name):
            "TAP \"\(name)\": invalid interface name (1 to 15 bytes, no '/', ':' or whitespace)"
        case .invalidQueueCount(let device, let count):
            "TAP \(device): invalid queue pair count \(count) (1...\(TapDevice.maximumQueuePairs))"
        case .invalidQueue(let device, let queue):
            "TAP \(device): no queue \(queue)"
        case .permissionDenied(let device, let error):
            "TAP \(device): permission denied (needs CAP_NET_ADMIN or ownership of the TAP): \(error)"
        case .nameInUseByNonTap(let device, let error):
            "TAP \(device): the name belongs to an interface that is not a TAP: \(error)"
        case .busy(let device, let error):
            "TAP \(device): single-queue TAP already attached by another process: \(error)"
        case .multiQueueNotSupported(let device, let existingSingleQueue):
            existingSingleQueue
                ? "TAP \(device): exists without multi_queue, cannot open several queues"
                : "TAP \(device): the kernel's tun driver does not support IFF_MULTI_QUEUE"
        case .incompatibleFlags(let device, let flags):
            "TAP \(device): attached with flags 0x\(String(flags, radix: 16)), needs vnet_hdr and no packet info"
        case .system(let device, let error):
            "TAP \(device): \(error)"
        }
    }
}
