"""The tables: medians over the turns, the paired and ceiling ratios, as fixed-width text (stdout) and
as Markdown (--markdown FILE). Pure: everything comes from a Results and the run's settings (tested
by test_report.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from . import stats
from .results import Results, Turn
from .schedule import CASES, MEMBERS, REFERENCE_CEILING, is_ceiling

NAMES = {
    "virtio-netd": "virtio-netd",
    "dpdk": "DPDK vhost+tap",
    "ceiling": "read() ceiling",
    "ceiling-uring": "io_uring ceiling",
    "ceiling-writev": "writev ceiling",
}
DIRECTIONS = {"tx": "guest->TAP", "rx": "TAP->guest"}

MAIN_HEADER = (
    ("direction", "frame", "backend", "Mpps", "Mpps per round", "Gbit/s", "CPU s/Mfr", "idle CPU",
     "vn/DPDK Mpps", "vn/DPDK CPU/fr", "of ceil. (Mpps)"),
    ("", "", "", "", "", "", "(backend)", "", "median (range)", "median (range)", "median (range)"),
)
DIAGNOSTICS_HEADER = (
    ("direction", "frame", "backend", "lost in", "TAP drops", "TAP input", "other CPU", "idle procs"),
    ("", "", "", "backend %", "per window", "Mpps (rx)", "s/window", "s/window"),
)
DIAGNOSTICS_WIDTHS = (12, 6, 20, 11, 12, 12, 11, 11)
NOISY_CORES = 0.1  # "other CPU" above this, averaged over the run: the machine was not quiet
LEGEND_WIDTH = 110


@dataclass(frozen=True)
class Settings:
    """The run's parameters as the report shows them. sizes_text and cases_text are the lists as
    given on the command line (comma-separated)."""
    rounds: int
    seconds: int
    warmup: int
    backoff: int
    sizes: tuple[int, ...]
    cases: tuple[str, ...]
    sizes_text: str
    cases_text: str
    cores: int = 2


def main_widths(rounds: int) -> tuple[int, ...]:
    """Column widths of the main text table; "Mpps per round" holds one 5-character figure per pair."""
    return (12, 6, 20, 7, max(14, rounds * 6 - 1), 7, 9, 8, 19, 19, 19)


def _fmt(x: float | None, pattern: str) -> str:
    return "-" if x is None else pattern % x


def _median_of(turns: dict[int, Turn], value: Callable[[Turn], float | None]) -> float | None:
    return stats.median(v for v in (value(t) for t in turns.values()) if v is not None)


def _rows(settings: Settings) -> list[tuple[str, int, str]]:
    return [(case, size, member)
            for case in CASES if case in settings.cases
            for size in settings.sizes
            for member in MEMBERS[case]]


def main_rows(results: Results, settings: Settings) -> list[list[str]]:
    rows = []
    for case, size, member in _rows(settings):
        turns = results.measured(case, size, member)
        failed = results.failed_pairs(case, size, member)
        mpps = _median_of(turns, lambda t: t.mpps)
        per_round = []
        for p in range(1, settings.rounds + 1):
            if p in turns:
                per_round.append(f"{turns[p].mpps:.3f}")
            elif p in failed:
                per_round.append("FAIL")
        vn = results.measured(case, size, "virtio-netd")
        dpdk = results.measured(case, size, "dpdk")
        ceiling = results.measured(case, size, REFERENCE_CEILING[case])
        vn_over_dpdk = cpu_over_dpdk = of_ceiling = ""
        if member == "virtio-netd":
            vn_over_dpdk = stats.spread(stats.paired_ratios({p: t.mpps for p, t in vn.items()},
                                                            {p: t.mpps for p, t in dpdk.items()}))
            cpu_over_dpdk = stats.spread(stats.paired_ratios({p: t.cpu for p, t in vn.items()},
                                                             {p: t.cpu for p, t in dpdk.items()}))
        if not is_ceiling(member):
            of_ceiling = stats.spread(stats.nearest_ceiling_ratios(
                {p: (t.t, t.mpps) for p, t in turns.items()},
                {p: (t.t, t.mpps) for p, t in ceiling.items()}))
        idle = "-" if is_ceiling(member) else _fmt(stats.median(results.idle.get(member, [])), "%.1f %%")
        rows.append([
            DIRECTIONS[case], f"{size} B", NAMES[member], _fmt(mpps, "%.3f"),
            "FAILED" if mpps is None else " ".join(per_round),
            _fmt(_median_of(turns, lambda t: t.gbps), "%.3f"),
            _fmt(_median_of(turns, lambda t: t.cpu), "%.3f"),
            idle, vn_over_dpdk, cpu_over_dpdk, of_ceiling,
        ])
    return rows


def diagnostics_rows(results: Results, settings: Settings) -> list[list[str]]:
    rows = []
    for case, size, member in _rows(settings):
        turns = results.measured(case, size, member)
        rows.append([
            DIRECTIONS[case], f"{size} B", NAMES[member],
            "-" if is_ceiling(member) else _fmt(_median_of(turns, lambda t: t.lost), "%.2f"),
            _fmt(_median_of(turns, lambda t: t.drops), "%d"),
            _fmt(_median_of(turns, lambda t: t.offered), "%.3f") if case == "rx" else "-",
            _fmt(_median_of(turns, lambda t: t.other), "%.2f"),
            _fmt(_median_of(turns, lambda t: t.idle_procs), "%.2f"),
        ])
    return rows


def text_table(header: Sequence[Sequence[str]], rows: Sequence[Sequence[str]], widths: Sequence[int]) -> list[str]:
    """Fixed-width lines: the first three columns left-aligned (12, 6 right-aligned, 20), the others
    right-aligned in `widths`, two spaces apart; the header's rows first; no trailing blanks."""
    def line(cells: Sequence[str]) -> str:
        text = f"{cells[0]:<12} {cells[1]:>6}  {cells[2]:<20}"
        for cell, width in zip(cells[3:], widths[3:]):
            text += f"  {cell:>{width}}"
        return text.rstrip(" ")
    return [line(cells) for cells in [*header, *rows]]


def markdown_table(header: Sequence[Sequence[str]], rows: Sequence[Sequence[str]]) -> list[str]:
    """One Markdown header row (each column's header lines joined by a space), then the rows."""
    def line(cells: Sequence[str]) -> str:
        return "|" + "".join(f" {cell} |" for cell in cells)
    titles = [" ".join(part for part in parts if part) for parts in zip(*header)]
    return [line(titles), "|" + "---|" * len(titles), *(line(cells) for cells in rows)]


def fold(text: str, width: int) -> str:
    """What `fold -s -w WIDTH` does to ASCII text: a line longer than WIDTH is broken after its last
    blank within the width (the blank ends the line), or at WIDTH if it has none."""
    out = []
    for line in text.split("\n"):
        while len(line) > width:
            cut = line.rfind(" ", 0, width) + 1  # after the last blank among the first WIDTH characters
            if cut == 0:
                cut = width
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return "\n".join(out)


def legend(rounds: int) -> str:
    return (
        f"Each case and frame size: {rounds} pairs of turns, a b then ceilings, then the reverse, alternating "
        "(a = virtio-netd, b = DPDK; guest->TAP: a b io_uring writev | writev io_uring b a | ...; TAP->guest: "
        "a b read() | read() b a | ...), all four backends and frontends up throughout, the ones not in the "
        "turn stopped. Mpps: guest->TAP = the TAP's rx_packets; TAP->guest = the frontend's RX counter "
        "(testpmd); read() ceiling = frames a plain read() loop took out of a TAP of its own (same "
        "generator, a busy loop on core 1 in place of the frontend); io_uring and writev ceilings = frames "
        "tap-write put into a TAP of its own from its cache (frames like the frontend's; batches of 64 "
        "io_uring writes, or one writev each; a busy loop on core 1). Mpps, Gbit/s, CPU s/Mfr: medians over "
        "the backend's turns; Mpps per round: every turn's figure, in pair order (FAIL: that turn failed). "
        "Gbit/s: frame bytes. CPU s/Mfr: the backend's utime+stime per million delivered frames over the "
        "window; idle CPU: % of one core with the frontend connected and no traffic (one window at the "
        "start). vn/DPDK Mpps and CPU/fr: paired ratios, for each pair virtio-netd's turn divided by the "
        "DPDK turn of the same pair (adjacent to it: a b or b a); shown as the median over the pairs and, "
        "in brackets, the lowest and highest. of ceil.: for each turn of the backend, its Mpps divided by "
        "the Mpps of the ceiling window (read() for TAP->guest, io_uring for guest->TAP) nearest to it in "
        "time (same case and size); median (lowest-highest) over the turns. Lost in backend: frames taken "
        "from the ring (tx) or the TAP (rx) but never delivered, over the whole turn; TAP drops: "
        "tx_dropped (rx) or rx_dropped (tx) in the window; TAP input: frames read + dropped at the TAP per "
        "second; other CPU: the machine's busy CPU time in the window minus the benchmark's processes "
        "(other work on the machine = noise, and softirqs); idle procs: the CPU time in the window of the "
        "run's backends and frontends not in the turn (stopped; should be about 0)."
    )


def noise_text(results: Results, settings: Settings) -> str | None:
    """The machine's other CPU, averaged over every measured window, in cores ("%.2f"); None if no
    window was measured."""
    cores = stats.mean_cores([t.other for t in results.all_measured()], settings.seconds)
    return None if cores is None else f"{cores:.2f}"


def text_report(results: Results, settings: Settings) -> str:
    """What goes to stdout."""
    s = settings
    lines = [
        "",
        f"End-to-end, virtio-netd (a) vs DPDK vhost+tap (b): frames of {s.sizes_text} B, {s.rounds} pairs "
        "of turns per case and size (a b, b a alternating, ceilings in between), "
        f"{s.seconds} s windows after {s.warmup} s warm-up; backend on core 0, frontend (testpmd "
        f"virtio-user) and generator on core 1; tap-flood -w {s.backoff}.",
        "",
        *text_table(MAIN_HEADER, main_rows(results, s), main_widths(s.rounds)),
        "",
        "Diagnostics (medians over the turns):",
        *text_table(DIAGNOSTICS_HEADER, diagnostics_rows(results, s), DIAGNOSTICS_WIDTHS),
        "",
        fold(legend(s.rounds), LEGEND_WIDTH),
    ]
    noise = noise_text(results, s)
    if noise is not None:
        verdict = ("the machine was NOT quiet, results are noisy" if float(noise) > NOISY_CORES
                   else "quiet machine")
        lines.append(f"Other CPU during the windows averaged {noise} cores (of {s.cores}): {verdict}.")
    return "\n".join(lines) + "\n"


def markdown_report(results: Results, settings: Settings) -> str:
    """What --markdown FILE gets."""
    s = settings
    lines = [
        f"End-to-end, one run of `scripts/bench/e2e --rounds {s.rounds} --seconds {s.seconds} --sizes "
        f"{s.sizes_text} --cases {s.cases_text}`: virtio-netd vs DPDK's vhost+tap backend (dpdk-testpmd, io "
        "forwarding), the same frontend (dpdk-testpmd, net_virtio_user), frames of "
        f"{s.sizes_text} B without FCS, {s.rounds} pairs of turns per case and size (a b, b a alternating, "
        f"ceilings in between), {s.seconds} s windows after {s.warmup} s warm-up. Backend on core 0; the "
        "frontend's forwarding lcore and the generator on core 1.",
        "",
        *markdown_table(MAIN_HEADER, main_rows(results, s)),
        "",
        *markdown_table(DIAGNOSTICS_HEADER, diagnostics_rows(results, s)),
        "",
        legend(s.rounds),
    ]
    noise = noise_text(results, s)
    if noise is not None:
        lines += ["", f"Other CPU during the windows averaged {noise} cores (of {s.cores})."]
    return "\n".join(lines) + "\n"
