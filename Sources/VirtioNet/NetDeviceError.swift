import Virtqueue

/// Errors the device returns to its VMM (or to the vhost-user layer): each names what was wrong.
public enum NetDeviceError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidConfiguration(String)
    /// The driver acknowledged features the device did not offer.
    case featuresNotOffered(VirtioNetFeatures)
    /// The driver acknowledged a feature without the ones it depends on.
    case missingPrerequisite(VirtioNetFeatures)
    /// VIRTIO_F_VERSION_1 is required: the device speaks only modern virtio.
    case legacyDriver
    case invalidState(String)
    case invalidQueue(index: Int, String)
    case queueSetup(index: Int, QueueSetupError)
    case backend(String)

    public var description: String {
        switch self {
        case let .invalidConfiguration(why): "invalid configuration: \(why)"
        case let .featuresNotOffered(features): "driver acknowledged features that were not offered: \(features)"
        case let .missingPrerequisite(feature): "driver acknowledged \(feature) without the features it depends on"
        case .legacyDriver: "driver did not acknowledge VIRTIO_F_VERSION_1"
        case let .invalidState(why): "invalid device state: \(why)"
        case let .invalidQueue(index, why): "queue \(index): \(why)"
        case let .queueSetup(index, error): "queue \(index): \(error)"
        case let .backend(why): "backend: \(why)"
        }
    }
}
