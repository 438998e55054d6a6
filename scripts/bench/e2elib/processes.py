"""Child processes and their end: starting them (each in a process group of its own, so a Ctrl-C at the
terminal reaches only this program, which then stops them in order), stopping one (a signal, then
SIGKILL after 5 s, reaped), stopping all that are left (newest first), waiting for a condition while
watching a process, and signals: SIGINT and SIGTERM become an Interrupted exception, held back while
a child is being started and registered so that none can escape the cleanup.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable, IO, Iterator, Sequence


def say(message: str) -> None:
    """Progress, to stderr."""
    print(f"e2e: {message}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived."""


_held = 0
_pending: int | None = None


def _on_signal(signo: int, _frame: object) -> None:
    global _pending
    if _held:
        _pending = signo
        return
    raise Interrupted(signal.Signals(signo).name)


def install_signal_handlers() -> None:
    for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signo, _on_signal)


def ignore_signals() -> None:
    """For the cleanup: it must run to its end (every wait in it is bounded)."""
    for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signo, signal.SIG_IGN)


@contextmanager
def signals_held() -> Iterator[None]:
    """Holds SIGINT/SIGTERM back for the block; one that arrived meanwhile is raised at its end."""
    global _held, _pending
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            signo, _pending = _pending, None
            raise Interrupted(signal.Signals(signo).name)


class Child:
    """A started process: its Popen, a name for messages, its log file and its stdin (a pipe) if any."""

    def __init__(self, popen: subprocess.Popen, name: str, log: str | None):
        self.popen = popen
        self.name = name
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdin(self) -> IO[bytes] | None:
        return self.popen.stdin

    def alive(self) -> bool:
        return self.popen.poll() is None


class ProcessTable:
    """The children this run started and has not stopped yet."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, command: Sequence[str], name: str, log: str | None = None, stdin_pipe: bool = False,
              header: str | None = None) -> Child:
        """Starts `command` with stdout and stderr appended to `log` (or discarded), stdin a pipe (or
        /dev/null). `header` (a line or more) is written to the log first."""
        if log is not None and header is not None:
            with open(log, "a") as f:
                f.write(header.rstrip("\n") + "\n")
        output = open(log, "ab") if log is not None else None
        try:
            with signals_held():
                popen = subprocess.Popen(list(command), stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                                         stdout=output if output is not None else subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, process_group=0)
                child = Child(popen, name, log)
                self.children.append(child)
        finally:
            if output is not None:
                output.close()
        return child

    def forget(self, child: Child) -> None:
        if child in self.children:
            self.children.remove(child)

    def stop(self, child: Child, signo: int = signal.SIGTERM, grace: float = 5.0) -> None:
        """Sends `signo` (if it still runs), then SIGKILL after `grace` seconds; reaps it."""
        if child.alive():
            try:
                child.popen.send_signal(signo)
            except ProcessLookupError:
                pass
            try:
                child.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                child.popen.kill()
        child.popen.wait()
        if child.stdin is not None:
            try:
                child.stdin.close()
            except OSError:
                pass
        self.forget(child)

    def stop_all(self) -> None:
        """Every child left: all are sent SIGTERM at once, newest first (frontends before their
        backends), then each is waited for (SIGKILL after 5 s)."""
        for child in reversed(self.children):
            if child.alive():
                try:
                    child.popen.terminate()
                except ProcessLookupError:
                    pass
        for child in reversed(list(self.children)):
            self.stop(child)


def wait_for(what: str, limit: float, child: Child | None, condition: Callable[[], bool]) -> bool:
    """Polls `condition` every 50 ms until it holds (True); False (with a message) when `child` has
    ended or `limit` seconds have passed. An OSError from the condition counts as not yet."""
    deadline = time.monotonic() + limit
    while True:
        try:
            if condition():
                return True
        except OSError:
            pass
        if child is not None and not child.alive():
            say(f"waiting for {what}: process {child.pid} ended")
            return False
        if time.monotonic() > deadline:
            say(f"waiting for {what}: no result within {limit:g} s")
            return False
        time.sleep(0.05)


def run(command: Sequence[str], check: bool = True, timeout: float | None = 60,
        cwd: str | None = None) -> subprocess.CompletedProcess:
    """A short command (set-up, queries): its output captured as text; a failure raises
    subprocess.CalledProcessError when `check`. Interrupted, it kills the command (subprocess.run does)."""
    return subprocess.run(list(command), check=check, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

