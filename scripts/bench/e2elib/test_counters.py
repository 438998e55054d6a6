"""The /proc parsers (counters.py) and the hugepage arithmetic (host.py)."""

import unittest

from e2elib import counters
from e2elib.counters import TapCounters
from e2elib.host import restore_target

# /proc/PID/stat of a thread whose name holds a space and parentheses; utime 1234, stime 56
STAT = ("4242 (rte worker) (1)) S 1 4242 4242 0 -1 4194560 2893 0 0 0 1234 56 0 0 20 0 6 0 "
        "1000 1234567 890 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0")

NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
e2e-vn: 7212480  120208    0    3    0     0          0         0 3000000   50000    0 7629    0     0       0          0
e2e-c12:123456789012 987654321    0    0    0     0          0         0        0       0    0    0    0     0       0          0
"""


class Cpu(unittest.TestCase):
    def test_utime_plus_stime_after_the_last_parenthesis(self):
        self.assertEqual(counters.stat_ticks(STAT), 1290)

    def test_busy_ticks_from_uptime_and_stat(self):
        uptime = "1000.00 1500.00\n"
        stat = ("cpu  40000 0 0 150000 10000 0 0 0 0 0\ncpu0 20000 0 0 75000 5000 0 0 0 0 0\n"
                "cpu1 20000 0 0 75000 5000 0 0 0 0 0\nintr 1\n")
        # 1000 s x 2 cores x 100 Hz - (150000 idle + 10000 iowait)
        self.assertEqual(counters.busy_ticks_from(uptime, stat, 2, 100), 40000)

    def test_no_cpu_line(self):
        with self.assertRaises(counters.CounterError):
            counters.busy_ticks_from("1.0 1.0", "intr 1\n", 2, 100)

    def test_a_reaped_process_counts_nothing(self):
        self.assertEqual(counters.cpu_ticks([None, 2**22 + 12345]), 0)


class NetDev(unittest.TestCase):
    def test_columns(self):
        parsed = counters.parse_net_dev(NET_DEV)
        self.assertEqual(parsed["e2e-vn"], TapCounters(rx_packets=120208, rx_bytes=7212480, rx_dropped=3,
                                                       tx_packets=50000, tx_bytes=3000000, tx_dropped=7629))
        # wide numbers leave no blank after the colon
        self.assertEqual(parsed["e2e-c12"].rx_bytes, 123456789012)
        self.assertEqual(parsed["e2e-c12"].rx_packets, 987654321)
        self.assertEqual(set(parsed), {"lo", "e2e-vn", "e2e-c12"})


class Misc(unittest.TestCase):
    def test_allowed_cores(self):
        self.assertEqual(counters.allowed_cores("Name:\tx\nCpus_allowed:\t1\nCpus_allowed_list:\t0\n"), "0")
        self.assertIsNone(counters.allowed_cores("Name:\tx\n"))

    def test_nonzero_drop_counters(self):
        text = ('# HELP virtio_net_drops_total Frames dropped\nvirtio_net_drops_total{device="bench",reason="a"} 0\n'
                'virtio_net_drops_total{device="bench",reason="b"} 12\nvirtio_net_rx_frames_total 5\n')
        self.assertEqual(counters.nonzero_drop_counters(text), 'virtio_net_drops_total{device="bench",reason="b"} 12')
        self.assertEqual(counters.nonzero_drop_counters("virtio_net_drops_total 0.0\n"), "")


class HugepagesRestore(unittest.TestCase):
    def test_gives_back_what_the_run_added(self):
        self.assertEqual(restore_target(current=1280, added=1280, before=0), 0)
        self.assertEqual(restore_target(current=1300, added=280, before=1020), 1020)

    def test_not_below_the_value_before_nor_above_the_current_one(self):
        # someone lowered it meanwhile: no lower than before the run
        self.assertEqual(restore_target(current=1100, added=280, before=1000), 1000)
        # someone lowered it below what it was: leave it
        self.assertEqual(restore_target(current=500, added=280, before=1000), 500)
        # someone raised it meanwhile: only this run's pages go
        self.assertEqual(restore_target(current=2000, added=280, before=1000), 1720)


if __name__ == "__main__":
    unittest.main()
