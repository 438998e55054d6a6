"""Driving an interactive dpdk-testpmd (-i): commands go to its stdin (a pipe that stays open for the
whole run, so it never sees EOF), answers are read from its log (stdout, line-buffered by stdbuf -oL)
after the offset the log had when the command was sent. A command is done when the next
"testpmd> " prompt appears ("stop" returns once the forwarding lcores have stopped). The parsers are
pure (tested by test_testpmd.py)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .processes import Child, wait_for

PROMPT = "testpmd> "
COMMAND_TIMEOUT = 10.0
_CLOSING_LINE = re.compile(r"^ *#+ *$")


@dataclass(frozen=True)
class PortStats:
    """From "show port stats 0": totals, and testpmd's rates since the previous "show port stats"."""
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    rx_pps: int
    rx_bps: int
    tx_pps: int
    tx_bps: int


def stats_answered(text: str) -> bool:
    """Whether `text` holds a complete answer: a "Tx-pps:" line and then the closing line of #s."""
    seen_tx_pps = False
    for line in text.splitlines():
        if "Tx-pps:" in line:
            seen_tx_pps = True
        elif seen_tx_pps and _CLOSING_LINE.match(line):
            return True
    return False


def parse_port_stats(text: str) -> PortStats | None:
    """The first "NIC statistics for port 0" block in `text` (every "Name: value" pair in it, up to
    its closing line of #s); None if there is none or a figure is missing."""
    values: dict[str, str] = {}
    inside = False
    for line in text.splitlines():
        if "NIC statistics for port 0" in line:
            inside = True
        if not inside:
            continue
        fields = line.split()
        for i in range(len(fields) - 1):
            values[fields[i]] = fields[i + 1]
        if _CLOSING_LINE.match(line):
            break
    try:
        return PortStats(*(int(values[key]) for key in (
            "RX-packets:", "RX-bytes:", "TX-packets:", "TX-bytes:", "Rx-pps:", "Rx-bps:", "Tx-pps:", "Tx-bps:")))
    except (KeyError, ValueError):
        return None


def read_from(path: str, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


class Testpmd:
    """A running dpdk-testpmd in interactive mode, its stdin a pipe and its output in `child.log`."""

    def __init__(self, child: Child, label: str):
        assert child.log is not None and child.stdin is not None
        self.child = child
        self.label = label  # for messages, e.g. "the DPDK backend"

    @property
    def log(self) -> str:
        assert self.child.log is not None
        return self.child.log

    def log_size(self) -> int:
        return os.stat(self.log).st_size

    def send(self, *lines: str) -> bool:
        """Writes the lines to its stdin without waiting; False if it has gone."""
        try:
            assert self.child.stdin is not None
            self.child.stdin.write("".join(f"{line}\n" for line in lines).encode())
            self.child.stdin.flush()
            return True
        except (BrokenPipeError, ValueError, OSError):
            return False

    def has_prompt(self) -> bool:
        return PROMPT in read_from(self.log, 0)

    def wait_for_prompt(self, limit: float) -> bool:
        return wait_for(f"{self.label}'s prompt", limit, self.child, self.has_prompt)

    def command(self, command: str) -> bool:
        """Sends one command and waits (10 s) for the next prompt: True once it has done it."""
        offset = self.log_size()
        if not self.send(command):
            return False
        return wait_for(f"'{command}' in {os.path.basename(self.log)}", COMMAND_TIMEOUT, self.child,
                        lambda: PROMPT in read_from(self.log, offset))

    def port_stats(self) -> PortStats | None:
        """Asks for "show port stats 0" and returns the answer; None if none came within 10 s."""
        offset = self.log_size()
        if not self.send("show port stats 0"):
            return None
        if not wait_for(f"{self.label}'s port statistics", COMMAND_TIMEOUT, self.child,
                        lambda: stats_answered(read_from(self.log, offset))):
            return None
        return parse_port_stats(read_from(self.log, offset))

    def quit(self) -> None:
        """Stops forwarding and quits; waits (10 s) for it to end. The caller then reaps it."""
        if self.child.alive() and self.send("stop", "quit"):
            wait_for(f"{self.label} to quit", COMMAND_TIMEOUT, None, lambda: not self.child.alive())
