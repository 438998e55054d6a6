"""The order of the turns (schedule.py), and why it is palindromic: a linear drift cancels."""

import unittest

from e2elib import stats
from e2elib.schedule import MEMBERS, Pair, schedule, turn_order


class TurnOrder(unittest.TestCase):
    def test_odd_pairs_in_order_even_pairs_reversed(self):
        self.assertEqual(turn_order(MEMBERS["tx"], 1), ["virtio-netd", "dpdk", "ceiling-uring", "ceiling-writev"])
        self.assertEqual(turn_order(MEMBERS["tx"], 2), ["ceiling-writev", "ceiling-uring", "dpdk", "virtio-netd"])
        self.assertEqual(turn_order(MEMBERS["rx"], 3), ["virtio-netd", "dpdk", "ceiling"])
        self.assertEqual(turn_order(MEMBERS["rx"], 4), ["ceiling", "dpdk", "virtio-netd"])

    def test_two_consecutive_pairs_form_a_palindrome(self):
        for members in MEMBERS.values():
            for first in (1, 3, 5):
                sequence = turn_order(members, first) + turn_order(members, first + 1)
                self.assertEqual(sequence, sequence[::-1])

    def test_pairs_start_at_one(self):
        with self.assertRaises(ValueError):
            turn_order(MEMBERS["rx"], 0)


class Schedule(unittest.TestCase):
    def test_tx_before_rx_then_sizes_as_given_then_pairs(self):
        pairs = list(schedule(("rx", "tx"), (1500, 64), 2))
        self.assertEqual([(p.case, p.size, p.pair) for p in pairs],
                         [("tx", 1500, 1), ("tx", 1500, 2), ("tx", 64, 1), ("tx", 64, 2),
                          ("rx", 1500, 1), ("rx", 1500, 2), ("rx", 64, 1), ("rx", 64, 2)])
        self.assertEqual(pairs[1], Pair("tx", 1500, 2, ("ceiling-writev", "ceiling-uring", "dpdk", "virtio-netd")))

    def test_only_the_cases_asked_for(self):
        self.assertEqual({p.case for p in schedule(("rx",), (64,), 3)}, {"rx"})
        self.assertEqual(len(list(schedule(("tx",), (64, 1500), 8))), 16)


class DriftCancels(unittest.TestCase):
    """The reason for the order: the host's speed drifts, windows seconds apart agree. With a speed that
    falls linearly in time, a (true 1.2x b) measured first in every pair would look faster than it
    is; alternating the order makes the paired ratios err both ways, and their median (over an even
    number of pairs, the mean of the middle two) is right to first order."""

    TURN_SECONDS = 3.6

    def measure(self, order_of_pair):
        speed = lambda t: 1.0 - 0.004 * t  # noqa: E731  -0.4 % a second
        true = {"virtio-netd": 1.2, "dpdk": 1.0, "ceiling-uring": 1.5, "ceiling-writev": 1.4}
        t = 0.0
        measured = {name: {} for name in true}
        for pair in range(1, 5):
            for name in order_of_pair(pair):
                measured[name][pair] = (t, true[name] * speed(t))
                t += self.TURN_SECONDS
        return measured

    def paired_median(self, measured):
        return stats.median(stats.paired_ratios({p: v for p, (_, v) in measured["virtio-netd"].items()},
                                                {p: v for p, (_, v) in measured["dpdk"].items()}))

    def test_palindromic_order_cancels_a_linear_drift(self):
        palindromic = self.paired_median(self.measure(lambda pair: turn_order(MEMBERS["tx"], pair)))
        fixed = self.paired_median(self.measure(lambda pair: list(MEMBERS["tx"])))
        # a fixed order errs by the drift over the 3.6 s from a to b (about 1.5 %, first order) ...
        self.assertGreater(fixed - 1.2, 0.015)
        # ... the palindrome only by what is left of it (second order: under a tenth of that)
        self.assertLess(abs(palindromic - 1.2), (fixed - 1.2) / 10)

    def test_nearest_ceiling_ratios_stay_close_under_drift(self):
        measured = self.measure(lambda pair: turn_order(MEMBERS["tx"], pair))
        ratios = stats.nearest_ceiling_ratios(measured["virtio-netd"], measured["ceiling-uring"])
        self.assertEqual(len(ratios), 4)
        self.assertAlmostEqual(stats.median(ratios), 1.2 / 1.5, delta=0.01)


if __name__ == "__main__":
    unittest.main()
