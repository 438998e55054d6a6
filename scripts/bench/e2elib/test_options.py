"""The command line (options.py): the bash version's options, defaults and messages."""

import unittest

from e2elib.options import HelpRequested, Options, UsageError, parse


class Parse(unittest.TestCase):
    def test_defaults(self):
        self.assertEqual(parse([]), Options(rounds=8, seconds=2, sizes=(64, 1500), cases=("tx", "rx"), markdown=None,
                                            warmup=1, backoff=100, sizes_text="64,1500", cases_text="tx,rx"))

    def test_every_option(self):
        o = parse(["--rounds", "2", "--seconds", "1", "--sizes", "1500,60", "--cases", "rx", "--markdown", "out.md",
                   "--warmup", "0", "--backoff", "0"])
        self.assertEqual((o.rounds, o.seconds, o.sizes, o.cases, o.markdown, o.warmup, o.backoff),
                         (2, 1, (1500, 60), ("rx",), "out.md", 0, 0))
        self.assertEqual((o.sizes_text, o.cases_text), ("1500,60", "rx"))

    def test_help(self):
        for flag in ("-h", "--help"):
            with self.assertRaises(HelpRequested):
                parse(["--rounds", "2", flag])

    def error(self, argv):
        with self.assertRaises(UsageError) as caught:
            parse(argv)
        return str(caught.exception)

    def test_messages(self):
        self.assertEqual(self.error(["--rounds", "0"]), "--rounds must be a positive integer")
        self.assertEqual(self.error(["--seconds", "1.5"]), "--seconds must be a positive integer")
        self.assertEqual(self.error(["--warmup", "-1"]), "--warmup must be a whole number of seconds")
        self.assertEqual(self.error(["--backoff", "1000001"]), "--backoff must be 0..1000000 microseconds")
        self.assertEqual(self.error(["--sizes", "64,59"]),
                         "frame size '59' is not in 60..1514 (frames without FCS, TAP MTU 1500)")
        self.assertEqual(self.error(["--sizes", "1515"]),
                         "frame size '1515' is not in 60..1514 (frames without FCS, TAP MTU 1500)")
        self.assertEqual(self.error(["--sizes", "64,64"]), "frame size 64 is given twice")
        self.assertEqual(self.error(["--cases", "tx,both"]), "--cases takes tx and/or rx, not 'both'")
        self.assertEqual(self.error(["--frames"]), "unknown argument --frames (see --help)")
        self.assertEqual(self.error(["--rounds"]), "--rounds needs a value")
        self.assertEqual(self.error(["--sizes", ""]), "--sizes needs a list")
        self.assertEqual(self.error(["--markdown"]), "--markdown needs a file")

    def test_a_case_given_twice_counts_once(self):
        self.assertEqual(parse(["--cases", "rx,tx,rx"]).cases, ("rx", "tx"))


if __name__ == "__main__":
    unittest.main()
