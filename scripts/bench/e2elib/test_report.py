"""The tables (report.py).

testdata/bash-results.tsv holds results in the format of the bash version of scripts/bench/e2e (its
results.tsv: case size backend pair t mpps gbps cpu other lost drops offered idle_procs, or FAILED;
idle lines), and testdata/bash-report.txt and bash-report.md what that version's awk program printed
for them with --rounds 3 --seconds 2 --sizes 64,1500 --cases tx,rx (stdout, and the --markdown file).
The Python tables must be the same, byte for byte.
"""

import dataclasses
import os
import subprocess
import unittest

from e2elib import report
from e2elib.report import Settings, fold, markdown_report, markdown_table, text_report, text_table
from e2elib.results import FailedTurn, Results, Turn

TESTDATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata")


def load_bash_results(path: str) -> Results:
    results = Results()
    with open(path) as f:
        for line in f:
            v = line.rstrip("\n").split("\t")
            if v[0] == "idle":
                results.add_idle(v[2], float(v[5]))
            elif v[5] == "FAILED":
                results.add(FailedTurn(v[0], int(v[1]), v[2], int(v[3]), float(v[4])))
            else:
                results.add(Turn(v[0], int(v[1]), v[2], int(v[3]), float(v[4]), float(v[5]), float(v[6]),
                                 float(v[7]), float(v[8]), float(v[9]), int(v[10]),
                                 None if v[11] == "-" else float(v[11]), float(v[12])))
    return results


def settings(**changes) -> Settings:
    base = Settings(rounds=3, seconds=2, warmup=1, backoff=100, sizes=(64, 1500), cases=("tx", "rx"),
                    sizes_text="64,1500", cases_text="tx,rx", cores=2)
    return dataclasses.replace(base, **changes)


def turn(case, size, member, pair, t, mpps, cpu=1.0, other=0.0, offered=None):
    return Turn(case, size, member, pair, t, mpps, mpps * size * 8 / 1000, cpu, other, 0.0, 0, offered, 0.0)


class SameAsTheBashVersion(unittest.TestCase):
    def setUp(self):
        self.results = load_bash_results(os.path.join(TESTDATA, "bash-results.tsv"))

    def expected(self, name):
        with open(os.path.join(TESTDATA, name)) as f:
            return f.read()

    def test_text_tables(self):
        self.assertEqual(text_report(self.results, settings()), self.expected("bash-report.txt"))

    def test_markdown_file(self):
        self.assertEqual(markdown_report(self.results, settings()), self.expected("bash-report.md"))


class Tables(unittest.TestCase):
    def test_text_columns_and_no_trailing_blanks(self):
        lines = text_table([("h1", "h2", "h3", "a", "b"), ("", "", "", "", "x")],
                           [["c1", "64 B", "name", "1.000", ""]], (12, 6, 20, 7, 5))
        self.assertEqual(lines, [
            "h1               h2  h3                          a      b",
            "                                                        x",
            "c1             64 B  name                    1.000",
        ])

    def test_markdown_joins_the_header_lines(self):
        lines = markdown_table([("a", "b", "c"), ("", "(x)", "")], [["1", "", "3"]])
        self.assertEqual(lines, ["| a | b (x) | c |", "|---|---|---|", "| 1 |  | 3 |"])

    def test_per_round_figures_fail_and_failed(self):
        results = Results()
        results.add(turn("rx", 64, "virtio-netd", 1, 10.0, 0.5))
        results.add(FailedTurn("rx", 64, "virtio-netd", 2, 20.0))
        results.add(FailedTurn("rx", 64, "dpdk", 1, 11.0))
        results.add(FailedTurn("rx", 64, "dpdk", 2, 19.0))
        rows = report.main_rows(results, settings(rounds=2, sizes=(64,), cases=("rx",)))
        by_name = {row[2]: row for row in rows}
        self.assertEqual(by_name["virtio-netd"][3:5], ["0.500", "0.500 FAIL"])
        self.assertEqual(by_name["DPDK vhost+tap"][3:5], ["-", "FAILED"])
        self.assertEqual(by_name["read() ceiling"][3:5], ["-", "FAILED"])  # no turn at all
        self.assertEqual(by_name["virtio-netd"][8], "-")  # no pair with both: no paired ratio

    def test_ratios_go_in_the_right_rows(self):
        results = Results()
        for pair, (t_vn, t_dpdk, t_c) in enumerate([(1.0, 2.0, 3.0), (6.0, 5.0, 4.0)], start=1):
            results.add(turn("rx", 64, "virtio-netd", pair, t_vn, 0.5, cpu=1.0))
            results.add(turn("rx", 64, "dpdk", pair, t_dpdk, 0.05, cpu=30.0))
            results.add(turn("rx", 64, "ceiling", pair, t_c, 0.625))
        results.add_idle("virtio-netd", 0.0)
        results.add_idle("dpdk", 100.0)
        rows = report.main_rows(results, settings(rounds=2, sizes=(64,), cases=("rx",)))
        vn, dpdk, ceiling = rows
        self.assertEqual(vn[7:], ["0.0 %", "10.0 (10.0-10.0)", "0.033 (0.033-0.033)", "0.80 (0.80-0.80)"])
        self.assertEqual(dpdk[7:], ["100.0 %", "", "", "0.080 (0.080-0.080)"])
        self.assertEqual(ceiling[7:], ["-", "", "", ""])

    def test_diagnostics_rows(self):
        results = Results()
        results.add(Turn("rx", 64, "dpdk", 1, 1.0, 0.04, 0.02, 30.0, 0.02, 65.0, 7, 0.12, 0.0))
        results.add(Turn("rx", 64, "dpdk", 2, 9.0, 0.04, 0.02, 30.0, 0.04, 64.0, 8, 0.14, 0.01))
        rows = report.diagnostics_rows(results, settings(rounds=2, sizes=(64,), cases=("rx",)))
        self.assertEqual(rows[1], ["TAP->guest", "64 B", "DPDK vhost+tap", "64.50", "7", "0.130", "0.03", "0.01"])
        self.assertEqual(rows[2][3], "-")  # ceilings lose nothing: a dash, not 0.00

    def test_mpps_per_round_column_widens_with_rounds(self):
        self.assertEqual(report.main_widths(2)[4], 14)
        self.assertEqual(report.main_widths(8)[4], 47)


class NoiseLine(unittest.TestCase):
    def results_with_other(self, *other):
        results = Results()
        for pair, o in enumerate(other, start=1):
            results.add(turn("tx", 64, "virtio-netd", pair, float(pair), 1.0, other=o))
        return results

    def last_line(self, results, **changes):
        return text_report(results, settings(seconds=2, sizes=(64,), cases=("tx",), **changes)).splitlines()[-1]

    def test_quiet_up_to_a_tenth_of_a_core(self):
        self.assertEqual(self.last_line(self.results_with_other(0.2, 0.2)),
                         "Other CPU during the windows averaged 0.10 cores (of 2): quiet machine.")

    def test_noisy_above(self):
        self.assertEqual(self.last_line(self.results_with_other(0.2, 0.24)),
                         "Other CPU during the windows averaged 0.11 cores (of 2): the machine was NOT quiet, "
                         "results are noisy.")

    def test_no_line_without_a_measured_window(self):
        self.assertTrue(self.last_line(Results()).endswith("(stopped; should be about 0)."))
        self.assertNotIn("Other CPU", markdown_report(Results(), settings()))


class Fold(unittest.TestCase):
    def test_breaks_after_the_last_blank_within_the_width(self):
        self.assertEqual(fold("aaa bbb ccc ddd", 8), "aaa bbb \nccc ddd")
        self.assertEqual(fold("aaa bbb", 7), "aaa bbb")

    def test_a_word_longer_than_the_width_is_cut(self):
        self.assertEqual(fold("abcdefghij kl", 4), "abcd\nefgh\nij \nkl")

    def test_same_as_fold_s(self):
        try:
            expected = subprocess.run(["fold", "-s", "-w", "110"], input=report.legend(8) + "\n", text=True,
                                      capture_output=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            self.skipTest("no fold(1) here")
        self.assertEqual(fold(report.legend(8), 110) + "\n", expected)


if __name__ == "__main__":
    unittest.main()
