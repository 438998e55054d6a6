"""What a run records: one entry per turn (measured or failed) and the idle windows. The measurements
(measure.py) fill it in; the report (report.py) reads it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Turn:
    """One measured turn of `member` (a backend or a ceiling) in pair `pair` of a case and frame size.

    t: the window's middle, seconds since the run started. mpps, gbps: delivered frames (Mpps) and
    frame bytes (Gbit/s) over the window. cpu: the member's CPU seconds per million delivered frames.
    other: the machine's busy CPU seconds in the window minus the benchmark's processes. lost: percent
    of the frames the backend took that it never delivered, over the whole turn (0 for ceilings).
    drops: the TAP's drop counter in the window. offered: frames read + dropped at the TAP (rx only),
    Mpps. idle_procs: CPU seconds in the window of the run's backends and frontends not in the turn.
    """
    case: str
    size: int
    member: str
    pair: int
    t: float
    mpps: float
    gbps: float
    cpu: float
    other: float
    lost: float
    drops: int
    offered: float | None
    idle_procs: float


@dataclass(frozen=True)
class FailedTurn:
    case: str
    size: int
    member: str
    pair: int
    t: float


@dataclass
class Results:
    turns: list[Turn | FailedTurn] = field(default_factory=list)
    # backend -> its CPU over the idle window(s), percent of one core
    idle: dict[str, list[float]] = field(default_factory=dict)

    def add(self, turn: Turn | FailedTurn) -> None:
        self.turns.append(turn)

    def add_idle(self, backend: str, percent: float) -> None:
        self.idle.setdefault(backend, []).append(percent)

    def measured(self, case: str, size: int, member: str) -> dict[int, Turn]:
        """pair -> the measured turn of that member (failed turns are absent)."""
        return {t.pair: t for t in self.turns
                if isinstance(t, Turn) and (t.case, t.size, t.member) == (case, size, member)}

    def failed_pairs(self, case: str, size: int, member: str) -> set[int]:
        return {t.pair for t in self.turns
                if isinstance(t, FailedTurn) and (t.case, t.size, t.member) == (case, size, member)}

    def all_measured(self) -> list[Turn]:
        return [t for t in self.turns if isinstance(t, Turn)]
