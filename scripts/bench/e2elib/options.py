"""The command line (pure; tested by test_options.py). The same options, defaults, checks and
messages as the bash version had; a usage error exits with status 2."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .schedule import CASES


class UsageError(Exception):
    """A bad command line; the message is printed after "e2e: "."""


class HelpRequested(Exception):
    pass


@dataclass(frozen=True)
class Options:
    rounds: int = 8
    seconds: int = 2
    sizes: tuple[int, ...] = (64, 1500)
    cases: tuple[str, ...] = ("tx", "rx")  # as given (for the report); duplicates removed
    markdown: str | None = None
    warmup: int = 1
    backoff: int = 100
    sizes_text: str = "64,1500"  # the lists as given, for the report's command line
    cases_text: str = "tx,rx"


_VALUED = {"--rounds": "a value", "--seconds": "a value", "--sizes": "a list", "--cases": "a list",
           "--markdown": "a file", "--warmup": "a value", "--backoff": "a value"}


def parse(argv: list[str]) -> Options:
    """Options from the arguments (without the program name). Raises UsageError or HelpRequested."""
    given: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise HelpRequested()
        if arg not in _VALUED:
            raise UsageError(f"unknown argument {arg} (see --help)")
        if i + 1 >= len(argv) or argv[i + 1] == "":
            raise UsageError(f"{arg} needs {_VALUED[arg]}")
        given[arg] = argv[i + 1]
        i += 2

    rounds = given.get("--rounds", "8")
    seconds = given.get("--seconds", "2")
    warmup = given.get("--warmup", "1")
    backoff = given.get("--backoff", "100")
    sizes_text = given.get("--sizes", "64,1500")
    cases_text = given.get("--cases", "tx,rx")
    if not re.fullmatch(r"[1-9][0-9]*", rounds):
        raise UsageError("--rounds must be a positive integer")
    if not re.fullmatch(r"[1-9][0-9]*", seconds):
        raise UsageError("--seconds must be a positive integer")
    if not re.fullmatch(r"[0-9]+", warmup):
        raise UsageError("--warmup must be a whole number of seconds")
    if not re.fullmatch(r"[0-9]+", backoff) or int(backoff) > 1_000_000:
        raise UsageError("--backoff must be 0..1000000 microseconds")

    sizes: list[int] = []
    for text in sizes_text.split(","):
        if not re.fullmatch(r"[0-9]+", text) or not 60 <= int(text) <= 1514:
            raise UsageError(f"frame size '{text}' is not in 60..1514 (frames without FCS, TAP MTU 1500)")
        if int(text) in sizes:
            raise UsageError(f"frame size {int(text)} is given twice")
        sizes.append(int(text))

    cases: list[str] = []
    for text in cases_text.split(","):
        if text not in CASES:
            raise UsageError(f"--cases takes tx and/or rx, not '{text}'")
        if text not in cases:
            cases.append(text)

    return Options(rounds=int(rounds), seconds=int(seconds), sizes=tuple(sizes), cases=tuple(cases),
                   markdown=given.get("--markdown"), warmup=int(warmup), backoff=int(backoff),
                   sizes_text=",".join(str(s) for s in sizes), cases_text=cases_text)
