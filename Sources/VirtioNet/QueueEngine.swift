import Virtqueue

/// One queue's engine as the worker and the device drive it, whatever its ring layout: the engines
/// are generic over the ring (`DeviceQueue`) and specialised for each, and only these calls, once per
/// pass, go through the protocol.
protocol QueueEngine: AnyObject, Sendable {
    /// The virtqueue index.
    var index: Int { get }
    /// Where the queue stands (vhost-user's vring base).
    var base: UInt32 { get }
    func enableNotifications() throws(VirtqueueError) -> Bool
    func disableNotifications()
}

/// A queue that moves frames between the guest and the backend.
protocol FrameEngine: QueueEngine {
    func process<Backend: PacketBackend>(backend: Backend, budget: Int) -> QueuePassResult
}

/// The receive side: it holds chains ahead, which go back before the queue stops.
protocol ReceiveEngine: FrameEngine {
    func returnCachedChains()
}

/// The control queue.
protocol ControlEngine: QueueEngine {
    func process(budget: Int) -> QueuePassResult
}
