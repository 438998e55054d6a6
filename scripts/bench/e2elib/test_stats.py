"""The benchmark's arithmetic (stats.py)."""

import unittest

from e2elib import stats


class WindowArithmetic(unittest.TestCase):
    def test_rates(self):
        self.assertAlmostEqual(stats.per_second_millions(3_000_000, 2.0), 1.5)
        # 1.5 Mpps of 1500-byte frames: 18 Gbit/s of frame bytes
        self.assertAlmostEqual(stats.gbit_per_second(3_000_000 * 1500, 2.0), 18.0)

    def test_cpu_per_million_frames(self):
        # 100 ticks at 100 Hz = 1 CPU second, spent on 2 million frames
        self.assertAlmostEqual(stats.cpu_seconds_per_mframe(100, 100, 2_000_000), 0.5)
        self.assertAlmostEqual(stats.cpu_seconds_per_mframe(250, 100, 500_000), 5.0)

    def test_percent_of_core(self):
        self.assertAlmostEqual(stats.percent_of_core(200, 100, 2.0), 100.0)  # a core busy for the window
        self.assertAlmostEqual(stats.percent_of_core(0, 100, 2.0), 0.0)
        self.assertAlmostEqual(stats.percent_of_core(5, 100, 1.0), 5.0)

    def test_other_cpu_is_busy_minus_ours(self):
        self.assertAlmostEqual(stats.other_cpu_seconds(busy_ticks=350, our_ticks=300, hz=100), 0.5)
        # tick sampling can make it slightly negative; it is reported as it is
        self.assertAlmostEqual(stats.other_cpu_seconds(busy_ticks=295, our_ticks=300, hz=100), -0.05)

    def test_machine_busy_ticks(self):
        # 1000 s up, 2 cores, 100 Hz: 200000 ticks of core time; 150000 idle + 10000 iowait
        self.assertAlmostEqual(stats.machine_busy_ticks(1000.0, 2, 100, 150_000, 10_000), 40_000)

    def test_lost_percent(self):
        self.assertAlmostEqual(stats.lost_percent(1000, 650), 35.0)
        self.assertEqual(stats.lost_percent(1000, 1000), 0.0)
        self.assertEqual(stats.lost_percent(0, 0), 0.0)  # nothing taken: nothing lost, no division


class Median(unittest.TestCase):
    def test_odd_count_is_the_middle_value(self):
        self.assertEqual(stats.median([3.0, 1.0, 2.0]), 2.0)
        self.assertEqual(stats.median([5.0]), 5.0)

    def test_even_count_is_the_mean_of_the_middle_two(self):
        self.assertEqual(stats.median([4.0, 1.0, 3.0, 2.0]), 2.5)
        self.assertEqual(stats.median([1, 2]), 1.5)

    def test_empty_is_none(self):
        self.assertIsNone(stats.median([]))

    def test_accepts_a_generator_and_ignores_order(self):
        self.assertEqual(stats.median(x for x in (9.0, -1.0, 4.0, 4.0, 0.0)), 4.0)


class PairedRatios(unittest.TestCase):
    def test_each_pair_over_the_same_pair(self):
        a = {1: 2.0, 2: 3.0, 3: 4.0}
        b = {1: 1.0, 2: 2.0, 3: 8.0}
        self.assertEqual(stats.paired_ratios(a, b), [2.0, 1.5, 0.5])

    def test_a_pair_missing_on_either_side_is_skipped(self):
        a = {1: 2.0, 3: 4.0, 4: 1.0}  # pair 2 failed for a
        b = {1: 1.0, 2: 2.0, 3: 2.0}  # pair 4 failed for b
        self.assertEqual(stats.paired_ratios(a, b), [2.0, 2.0])

    def test_a_denominator_that_is_not_positive_is_skipped(self):
        self.assertEqual(stats.paired_ratios({1: 1.0, 2: 1.0}, {1: 0.0, 2: 4.0}), [0.25])

    def test_ascending_pair_order_whatever_the_insertion_order(self):
        self.assertEqual(stats.paired_ratios({3: 3.0, 1: 1.0}, {1: 1.0, 3: 1.0}), [1.0, 3.0])


class NearestCeiling(unittest.TestCase):
    def test_each_turn_over_the_ceiling_window_nearest_in_time(self):
        turns = {1: (10.0, 1.0), 2: (30.0, 1.0)}
        ceilings = {1: (12.0, 2.0), 2: (27.0, 4.0)}
        self.assertEqual(stats.nearest_ceiling_ratios(turns, ceilings), [0.5, 0.25])

    def test_nearest_may_be_another_pairs_ceiling(self):
        # the palindrome puts a pair's last turn next to the next pair's ceilings
        turns = {1: (10.0, 1.0), 2: (21.0, 1.0)}
        ceilings = {1: (20.0, 2.0), 2: (40.0, 4.0)}
        self.assertEqual(stats.nearest_ceiling_ratios(turns, ceilings), [0.5, 0.5])

    def test_a_tie_goes_to_the_lower_pair(self):
        turns = {1: (15.0, 1.0)}
        self.assertEqual(stats.nearest_ceiling_ratios(turns, {2: (20.0, 4.0), 1: (10.0, 2.0)}), [0.5])

    def test_failed_ceilings_are_not_candidates(self):
        turns = {1: (10.0, 1.0)}
        self.assertEqual(stats.nearest_ceiling_ratios(turns, {2: (50.0, 4.0)}), [0.25])  # pair 1's failed
        self.assertEqual(stats.nearest_ceiling_ratios(turns, {}), [])

    def test_a_nearest_ceiling_that_is_not_positive_gives_no_ratio(self):
        turns = {1: (10.0, 1.0), 2: (30.0, 1.0)}
        self.assertEqual(stats.nearest_ceiling_ratios(turns, {1: (10.0, 0.0), 2: (30.0, 2.0)}), [0.5])


class RatioText(unittest.TestCase):
    def test_significant_digits_by_size(self):
        self.assertEqual(stats.ratio_text(0.0654), "0.065")
        self.assertEqual(stats.ratio_text(0.1), "0.10")
        self.assertEqual(stats.ratio_text(0.864), "0.86")
        self.assertEqual(stats.ratio_text(9.994), "9.99")
        self.assertEqual(stats.ratio_text(10.0), "10.0")
        self.assertEqual(stats.ratio_text(12.34), "12.3")

    def test_spread_is_median_and_range(self):
        self.assertEqual(stats.spread([1.19, 1.10, 1.13]), "1.13 (1.10-1.19)")
        self.assertEqual(stats.spread([0.05, 12.0]), "6.03 (0.050-12.0)")  # median of two: their mean
        self.assertEqual(stats.spread([2.0]), "2.00 (2.00-2.00)")

    def test_spread_of_nothing_is_a_dash(self):
        self.assertEqual(stats.spread([]), "-")


class MeanCores(unittest.TestCase):
    def test_average_cpu_seconds_per_window_in_cores(self):
        self.assertAlmostEqual(stats.mean_cores([0.1, 0.3], 2), 0.1)
        self.assertIsNone(stats.mean_cores([], 2))


if __name__ == "__main__":
    unittest.main()
