#if canImport(Glibc)
import Glibc
#endif
import CVirtioShim

/// A named OS thread that runs one closure and can be joined. Data-path workers need a thread of
/// their own that sleeps in epoll_wait, which Swift concurrency's cooperative pool must not do.
public final class WorkerThread: @unchecked Sendable {
    private var thread: pthread_t
    private var joined = false

    private final class Box {
        let name: String
        let body: @Sendable () -> Void
        init(name: String, body: @escaping @Sendable () -> Void) {
            self.name = name
            self.body = body
        }
    }

    /// Starts `body` on a new thread; `name` is cut to the kernel's 15 bytes.
    public init(name: String, body: @escaping @Sendable () -> Void) throws(SystemError) {
        let box = Unmanaged.passRetained(Box(name: name, body: body))
        var thread = pthread_t()
        let result = pthread_create(&thread, nil, { argument in
            let box = Unmanaged<Box>.fromOpaque(argument!).takeRetainedValue()
            _ = cvs_set_thread_name(String(box.name.utf8.prefix(15))!)
            box.body()
            return nil
        }, box.toOpaque())
        guard result == 0 else {
            box.release()
            throw SystemError(call: "pthread_create", code: result)
        }
        self.thread = thread
    }

    /// Waits for the thread to finish. Call once, from another thread.
    public func join() {
        guard !joined else { return }
        joined = true
        pthread_join(thread, nil)
    }

    deinit {
        if !joined { pthread_detach(thread) }
    }
}
