#if canImport(Glibc)
import Glibc
#endif

/// The process's limit on open file descriptors (RLIMIT_NOFILE): the soft limit is what open,
/// socket, accept, eventfd and epoll_create fail past (EMFILE); the hard limit is how far an
/// unprivileged process may raise it.
public enum OpenFileLimit {
    public static func current() throws(SystemError) -> (soft: UInt64, hard: UInt64) {
        var limit = rlimit()
        _ = try retryingOnInterrupt("getrlimit(RLIMIT_NOFILE)") { getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) }
        return (UInt64(limit.rlim_cur), UInt64(limit.rlim_max))
    }

    public static func set(soft: UInt64, hard: UInt64) throws(SystemError) {
        var limit = rlimit(rlim_cur: rlim_t(soft), rlim_max: rlim_t(hard))
        _ = try retryingOnInterrupt("setrlimit(RLIMIT_NOFILE)") { setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) }
    }

    /// Raises the soft limit to the hard one; returns the soft limit before and after.
    @discardableResult
    public static func raiseSoftToHard() throws(SystemError) -> (previous: UInt64, now: UInt64) {
        let (soft, hard) = try current()
        if soft < hard { try set(soft: hard, hard: hard) }
        return (soft, try current().soft)
    }
}
