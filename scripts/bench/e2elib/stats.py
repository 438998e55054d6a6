"""The benchmark's arithmetic: pure functions, no I/O (tested by test_stats.py).

Rates and CPU figures of one window, medians, paired ratios (each virtio-netd turn over the DPDK turn
of the same pair), ratios to the ceiling window nearest in time, and how a ratio is written.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence


# ---- one window ------------------------------------------------------------------------------------

def per_second_millions(count: float, seconds: float) -> float:
    """Frames per second in millions (Mpps) for `count` frames over `seconds`."""
    return count / seconds / 1e6


def gbit_per_second(frame_bytes: float, seconds: float) -> float:
    """Gbit/s of frame bytes over `seconds`."""
    return frame_bytes * 8 / seconds / 1e9


def cpu_seconds_per_mframe(ticks: float, hz: float, frames: float) -> float:
    """CPU seconds per million frames: `ticks` clock ticks (utime+stime, at `hz` a second) spent on
    `frames` frames."""
    return ticks / hz / (frames / 1e6)


def percent_of_core(ticks: float, hz: float, seconds: float) -> float:
    """`ticks` clock ticks over `seconds` of wall-clock time, as a percentage of one core."""
    return ticks / hz / seconds * 100


def other_cpu_seconds(busy_ticks: float, our_ticks: float, hz: float) -> float:
    """The machine's busy CPU time that was not the benchmark's own processes, in seconds."""
    return (busy_ticks - our_ticks) / hz


def lost_percent(taken: int, delivered: int) -> float:
    """Frames a backend took and never delivered, as a percentage of those it took (0 if none)."""
    return (taken - delivered) / taken * 100 if taken > 0 else 0.0


def machine_busy_ticks(uptime_seconds: float, cores: int, hz: float, idle_ticks: float, iowait_ticks: float) -> float:
    """The machine's busy CPU time since boot, all cores, in clock ticks: the cores' time (uptime x
    cores) minus their idle and iowait time. (The user/system/... samples of /proc/stat miss much of
    the work of a core that sleeps and wakes thousands of times a second.)"""
    return uptime_seconds * cores * hz - (idle_ticks + iowait_ticks)


# ---- over the turns --------------------------------------------------------------------------------

def median(values: Iterable[float]) -> float | None:
    """The median (the mean of the two middle values for an even count); None for no values."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return None
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def paired_ratios(numerators: Mapping[int, float], denominators: Mapping[int, float]) -> list[float]:
    """numerators[p] / denominators[p] for each pair p (ascending) that has a turn in both, skipping a
    denominator that is not positive. The keys are pair numbers; a failed turn has no entry."""
    return [numerators[p] / denominators[p]
            for p in sorted(numerators)
            if p in denominators and denominators[p] > 0]


def nearest_ceiling_ratios(turns: Mapping[int, tuple[float, float]],
                           ceilings: Mapping[int, tuple[float, float]]) -> list[float]:
    """For each turn (pair -> (time, value)), ascending by pair: its value over the value of the
    ceiling window (pair -> (time, value)) nearest to it in time; on a tie the ceiling of the lower
    pair. A turn gets no ratio when there is no ceiling window or the nearest one's value is not
    positive."""
    ratios = []
    for p in sorted(turns):
        t, value = turns[p]
        best: int | None = None
        best_distance = 0.0
        for q in sorted(ceilings):
            distance = abs(t - ceilings[q][0])
            if best is None or distance < best_distance:
                best, best_distance = q, distance
        if best is not None and ceilings[best][1] > 0:
            ratios.append(value / ceilings[best][1])
    return ratios


def ratio_text(x: float) -> str:
    """A ratio with 2 or 3 significant digits: 0.065, 0.86, 12.3."""
    if x < 0.1:
        return f"{x:.3f}"
    if x < 10:
        return f"{x:.2f}"
    return f"{x:.1f}"


def spread(ratios: Sequence[float]) -> str:
    """ "median (lowest-highest)" of some ratios, or "-" for none."""
    if not ratios:
        return "-"
    m = median(ratios)
    assert m is not None
    return f"{ratio_text(m)} ({ratio_text(min(ratios))}-{ratio_text(max(ratios))})"


def mean_cores(cpu_seconds: Sequence[float], window_seconds: float) -> float | None:
    """The average, over windows of `window_seconds`, of CPU seconds per window, in cores; None for
    no windows."""
    if not cpu_seconds:
        return None
    return sum(cpu_seconds) / len(cpu_seconds) / window_seconds
