"""Reading testpmd's answers (testpmd.py). The samples are dpdk-testpmd 22.11's own output."""

import unittest

from e2elib.testpmd import PortStats, parse_port_stats, stats_answered

ANSWER = """testpmd> show port stats 0

  ######################## NIC statistics for port 0  ########################
  RX-packets: 24562304   RX-missed: 0          RX-bytes:  1473738240
  RX-errors: 0
  RX-nombuf:  0         
  TX-packets: 17         TX-errors: 0          TX-bytes:  1020

  Throughput (since last show)
  Rx-pps:     10983617          Rx-bps:   5272136160
  Tx-pps:            3          Tx-bps:         1440
  ############################################################################
testpmd> """


class PortStatistics(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(parse_port_stats(ANSWER), PortStats(rx_packets=24562304, rx_bytes=1473738240, tx_packets=17,
                                                             tx_bytes=1020, rx_pps=10983617, rx_bps=5272136160,
                                                             tx_pps=3, tx_bps=1440))

    def test_only_the_first_answer(self):
        second = ANSWER.replace("24562304", "99")
        self.assertEqual(parse_port_stats(ANSWER + "\n" + second).rx_packets, 24562304)

    def test_no_answer(self):
        self.assertIsNone(parse_port_stats("testpmd> "))
        self.assertIsNone(parse_port_stats(ANSWER.split("Throughput")[0]))  # cut short: rates missing

    def test_answered_only_once_complete(self):
        self.assertTrue(stats_answered(ANSWER))
        self.assertFalse(stats_answered(ANSWER[:ANSWER.index("  ####################################")]))
        self.assertFalse(stats_answered(""))
        # the opening line of #s (with the title) does not count as the end
        self.assertFalse(stats_answered(ANSWER.split("RX-packets")[0]))


if __name__ == "__main__":
    unittest.main()
