import GuestMemory

/// What the device's engines need of a virtqueue, whatever its layout: the split ring (`SplitQueue`)
/// or the packed ring (`PackedQueue`). The engines are generic over it, so each layout gets its own
/// specialised code and no frame pays for a dynamic dispatch.
///
/// Chains are given back in the order they were taken (the engines complete in order), which the
/// packed ring relies on to place its used elements and the split ring does not mind.
public protocol DeviceQueue: Sendable {
    /// The guest memory the rings and buffers live in.
    var memory: GuestMemory { get }
    /// Entries in the ring.
    var entries: Int { get }
    /// Where the queue stands, as vhost-user's vring base: the split ring's next available index, or
    /// the packed ring's next available index with its wrap counter in bit 15 and its next used index
    /// with its wrap counter in bit 31.
    var base: UInt32 { get }

    /// Takes the next available chain and appends its buffers to `iovecs` (nil when none is
    /// available). On `.badChain` the chain is consumed and nothing appended: give it back with
    /// `addUsed(head:length: 0)`. On `.broken` nothing was consumed.
    mutating func popChain(into iovecs: inout IOVecArray) throws(VirtqueueError) -> DescriptorChain?
    /// Puts back the last `count` chains popped and not used; they will be popped again.
    mutating func undoPop(_ count: Int)
    /// Gives a chain back with `length` bytes written into it; seen by the driver after `publishUsed()`.
    mutating func addUsed(head: ChainHead, length: UInt32)
    /// Makes every chain given back so far visible to the driver at once.
    mutating func publishUsed()
    /// Whether the driver wants an interrupt for what was published since the last call.
    mutating func needsInterrupt() -> Bool
    /// Asks the driver not to notify: the device is about to process the ring anyway.
    mutating func disableNotifications()
    /// Asks the driver to notify for the next chain; true when chains arrived meanwhile (process
    /// them instead of sleeping).
    mutating func enableNotifications() throws(VirtqueueError) -> Bool
    /// Marks the guest pages of the ring the device writes (used elements, notification areas) in
    /// `log`, when the queue knows where they are in guest-physical memory.
    func markDeviceWrites(in log: DirtyLog)
}
