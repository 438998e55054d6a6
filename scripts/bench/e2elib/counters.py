"""Counters read from /proc: a process's CPU time, the machine's busy time, a TAP's packet counters,
thread affinities, and virtio-netd's drop counters from its metrics text. The parsers are pure
functions (tested by test_counters.py); the readers only open files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

from . import stats


class CounterError(Exception):
    """A counter could not be read (e.g. the TAP is gone)."""


# ---- CPU -------------------------------------------------------------------------------------------

def stat_ticks(stat_line: str) -> int:
    """utime+stime in clock ticks from a /proc/PID/stat line (fields 14 and 15; the command name in
    parentheses may hold spaces and parentheses, so fields are counted after its last ')')."""
    fields = stat_line[stat_line.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def cpu_ticks(pids: Iterable[int | None]) -> int:
    """utime+stime of the processes (all their threads), in clock ticks; a process that has been
    reaped counts 0 (one that has ended but not been reaped still shows its total)."""
    total = 0
    for pid in pids:
        if pid is None:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                total += stat_ticks(f.read())
        except (OSError, ValueError, IndexError):
            continue
    return total


def busy_ticks_from(uptime_text: str, stat_text: str, cores: int, hz: int) -> float:
    """The machine's busy CPU ticks since boot from /proc/uptime and /proc/stat (see
    stats.machine_busy_ticks)."""
    uptime = float(uptime_text.split()[0])
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            return stats.machine_busy_ticks(uptime, cores, hz, float(fields[4]), float(fields[5]))
    raise CounterError("no 'cpu' line in /proc/stat")


def busy_ticks(cores: int, hz: int) -> float:
    with open("/proc/uptime") as u, open("/proc/stat") as s:
        return busy_ticks_from(u.read(), s.read(), cores, hz)


# ---- TAP counters ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TapCounters:
    rx_packets: int
    rx_bytes: int
    rx_dropped: int
    tx_packets: int
    tx_bytes: int
    tx_dropped: int


def parse_net_dev(text: str) -> dict[str, TapCounters]:
    """/proc/PID/net/dev: every interface's counters. Its columns are the kernel's rtnl_link_stats64,
    as in /sys/class/net/IF/statistics (receive drops there are rx_dropped + rx_missed_errors; a TAP
    has no missed errors)."""
    counters = {}
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        f = rest.split()
        if len(f) < 16:
            continue
        counters[name.strip()] = TapCounters(rx_packets=int(f[1]), rx_bytes=int(f[0]), rx_dropped=int(f[3]),
                                             tx_packets=int(f[9]), tx_bytes=int(f[8]), tx_dropped=int(f[11]))
    return counters


def tap_counters(anchor_pid: int, interface: str) -> TapCounters:
    """The counters of `interface` in the network namespace of process `anchor_pid`."""
    try:
        with open(f"/proc/{anchor_pid}/net/dev") as f:
            text = f.read()
    except OSError as error:
        raise CounterError(f"cannot read /proc/{anchor_pid}/net/dev: {error}") from error
    found = parse_net_dev(text).get(interface)
    if found is None:
        raise CounterError(f"no interface {interface} in the benchmark's namespace")
    return found


# ---- threads and metrics ---------------------------------------------------------------------------

def allowed_cores(status_text: str) -> str | None:
    for line in status_text.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split()[1]
    return None


def affinity(pid: int) -> str:
    """"thread-name:cores ..." for every thread of the process (Cpus_allowed_list)."""
    out = []
    try:
        tasks = sorted(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return ""
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                name = f.read().rstrip("\n")
            with open(f"/proc/{pid}/task/{task}/status") as f:
                cores = allowed_cores(f.read())
        except OSError:
            continue
        if cores is not None:
            out.append(f"{name.replace(' ', '_')}:{cores}")
    return " ".join(out)


def nonzero_drop_counters(metrics_text: str) -> str:
    """The virtio_net_drops_total samples that are not zero, "; "-separated (Prometheus text)."""
    found = []
    for line in metrics_text.splitlines():
        if not line.startswith("virtio_net_drops_total"):
            continue
        try:
            if float(line.split()[-1]) != 0:
                found.append(line)
        except ValueError:
            found.append(line)
    return "; ".join(found)
