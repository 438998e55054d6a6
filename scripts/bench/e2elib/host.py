"""The machine's side of a run: prerequisites, building virtio-netd and the C tools, hugepages (raised
if short, restored at the end), a hugetlbfs mount of the run's own, the network namespace (with an
anchor process whose /proc/PID/net/dev shows the namespace's interface counters), and the temporary
directory. Everything made here is undone by Cleanup, in reverse order, also after a failure or an
interrupt."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable

from .counters import TapCounters, tap_counters
from .processes import Child, ProcessTable, run, say, signals_held

HUGEPAGES_NEEDED = 1280  # 2 MiB pages: three testpmd at once, about 300 each (their mbuf pools outgrow -m)
C_TOOLS = ("tap-flood", "tap-read", "tap-write")
DPDK_RUNTIME = "/var/run/dpdk"
TAP_UP = re.compile(r"<[^>]*\bUP\b")


class Fatal(Exception):
    """The run cannot go on; the message is printed after "e2e: "."""


class Cleanup:
    """Undo actions, run newest first; each one's failure is reported and the others still run."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, action: Callable[[], None]) -> None:
        self._actions.append((what, action))

    def run(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except Exception as error:  # keep going: the rest must still be undone
                say(f"cleanup: {what}: {error}")


# ---- prerequisites and builds ----------------------------------------------------------------------

def check_prerequisites(repo: str) -> None:
    if os.geteuid() != 0:
        raise Fatal("needs root (network namespace, TAP devices, hugepages)")
    if shutil.which("gcc") is None:
        raise Fatal("gcc is missing: it compiles tap-flood.c, tap-read.c and tap-write.c "
                    "(install the Debian package gcc); stopping")
    if shutil.which("swift") is None:
        raise Fatal("swift is missing: it builds virtio-netd")
    for cpu in (0, 1):
        if not os.path.isdir(f"/sys/devices/system/cpu/cpu{cpu}"):
            raise Fatal("needs cores 0 and 1")
    if shutil.which("dpdk-testpmd") is None or shutil.which("ip") is None:
        say("dpdk-testpmd or ip is missing: running scripts/install-deps all")
        subprocess.run([os.path.join(repo, "scripts/install-deps"), "all"], check=True, stdin=subprocess.DEVNULL)
        if shutil.which("dpdk-testpmd") is None:
            raise Fatal("dpdk-testpmd is still missing after scripts/install-deps all")
    for tool in ("taskset", "stdbuf", "mount", "umount"):
        if shutil.which(tool) is None:
            raise Fatal(f"{tool} is missing")
    if not os.path.exists("/dev/net/tun"):
        raise Fatal("/dev/net/tun is missing")


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def build_virtio_netd(repo: str, work: str) -> str:
    """swift build -c release --product virtio-netd; returns the executable's path."""
    say("building virtio-netd (swift build -c release --product virtio-netd)")
    log = os.path.join(work, "build.log")
    with open(log, "wb") as f:
        status = subprocess.run(["swift", "build", "-c", "release", "--product", "virtio-netd"], cwd=repo,
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT).returncode
    if status != 0:
        print(_tail(log, 40), end="", file=sys.stderr)
        raise Fatal("swift build failed")
    bin_path = run(["swift", "build", "-c", "release", "--show-bin-path"], timeout=300, cwd=repo).stdout.strip()
    daemon = os.path.join(repo, bin_path, "virtio-netd")
    if not os.access(daemon, os.X_OK):
        raise Fatal(f"no virtio-netd at {daemon} after the build")
    return daemon


def compile_tools(here: str, work: str) -> dict[str, str]:
    """gcc -O2 -Wall for tap-flood.c, tap-read.c and tap-write.c; returns name -> executable."""
    version = run(["gcc", "--version"]).stdout.splitlines()[0]
    say(f"compiling tap-flood.c, tap-read.c and tap-write.c with {version}")
    tools = {}
    for name in C_TOOLS:
        output = os.path.join(work, name)
        result = run(["gcc", "-O2", "-Wall", "-o", output, os.path.join(here, f"{name}.c")], check=False)
        if result.returncode != 0:
            print(result.stderr, end="", file=sys.stderr)
            raise Fatal(f"gcc could not compile {os.path.join(here, name + '.c')}")
        tools[name] = output
    return tools


# ---- hugepages ---------------------------------------------------------------------------------------

def free_hugepages() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    raise Fatal("no HugePages_Free in /proc/meminfo")


def _nr_hugepages() -> int:
    with open("/proc/sys/vm/nr_hugepages") as f:
        return int(f.read())


def _set_nr_hugepages(value: int) -> None:
    with open("/proc/sys/vm/nr_hugepages", "w") as f:
        f.write(f"{value}\n")


def restore_target(current: int, added: int, before: int) -> int:
    """What nr_hugepages goes back to: what this run added is given back and no more (someone else may
    have changed it meanwhile): current - added, but not below the value before the run, nor above the
    current one."""
    return min(max(current - added, before), current)


def ensure_hugepages(cleanup: Cleanup) -> None:
    """Raises nr_hugepages if fewer than HUGEPAGES_NEEDED are free; the cleanup restores it."""
    free = free_hugepages()
    if free >= HUGEPAGES_NEEDED:
        return
    before = _nr_hugepages()
    added = HUGEPAGES_NEEDED - free

    def restore() -> None:
        target = restore_target(_nr_hugepages(), added, before)
        try:
            _set_nr_hugepages(target)
        except OSError:
            say(f"could not set nr_hugepages back to {target}")
        say(f"nr_hugepages back to {_nr_hugepages()} (it was {before} before the run)")

    with signals_held():
        cleanup.push("restoring nr_hugepages", restore)
        _set_nr_hugepages(before + added)
    say(f"nr_hugepages raised from {before} to {_nr_hugepages()} (2 MiB each; restored at the end)")
    free = free_hugepages()
    if free < HUGEPAGES_NEEDED:
        raise Fatal(f"only {free} free hugepages after raising nr_hugepages; need {HUGEPAGES_NEEDED}")


def mount_hugetlbfs(path: str, cleanup: Cleanup) -> None:
    os.makedirs(path, exist_ok=True)

    def unmount() -> None:
        if os.path.ismount(path):
            result = run(["umount", path], check=False)
            if result.returncode != 0:
                say(f"could not unmount {path}")

    with signals_held():
        cleanup.push(f"unmounting {path}", unmount)
    run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "nodev", path])


# ---- the work directory ----------------------------------------------------------------------------

def make_work_directory(cleanup: Cleanup, mount: str) -> str:
    """A fresh /tmp/e2e-bench.PID.XXXXXX; removed at the end unless `mount` (inside it) is still
    mounted."""
    work = tempfile.mkdtemp(prefix=f"e2e-bench.{os.getpid()}.", dir="/tmp")

    def remove() -> None:
        if os.path.ismount(os.path.join(work, mount)):
            say(f"left {work} in place: {os.path.join(work, mount)} is still mounted")
        else:
            shutil.rmtree(work, ignore_errors=True)

    cleanup.push(f"removing {work}", remove)
    return work


def remove_dpdk_runtime_directories(cleanup: Cleanup, prefixes: list[str]) -> None:
    """The cleanup removes /var/run/dpdk/PREFIX (root's DPDK runtime directory; made even with
    --in-memory, and left behind empty) for the run's own --file-prefix values."""
    def remove() -> None:
        for prefix in prefixes:
            path = os.path.join(DPDK_RUNTIME, prefix)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)

    cleanup.push("removing DPDK's runtime directories", remove)


# ---- the network namespace -------------------------------------------------------------------------

class Namespace:
    """A network namespace made for the run: lo up, IPv6 off (no stray frames). Everything still
    running in it at the end is killed before it is deleted."""

    def __init__(self, name: str, processes: ProcessTable, cleanup: Cleanup):
        self.name = name
        self.anchor: Child | None = None

        def delete() -> None:
            if not os.path.exists(f"/run/netns/{name}"):
                return
            pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", name], check=False)

        with signals_held():
            cleanup.push(f"deleting namespace {name}", delete)
            run(["ip", "netns", "add", name])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
             "net.ipv6.conf.default.disable_ipv6=1"])
        # A process that only sleeps in the namespace: /proc/ANCHOR/net/dev has the namespace's
        # interface counters, read without starting a process per read.
        self.anchor = processes.start(self.exec_command(["sleep", "infinity"]), "namespace anchor")

    def exec_command(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def counters(self, tap: str) -> TapCounters:
        assert self.anchor is not None
        return tap_counters(self.anchor.pid, tap)

    def tap_is_up(self, tap: str) -> bool:
        result = run(["ip", "-n", self.name, "-o", "link", "show", "dev", tap], check=False)
        return result.returncode == 0 and TAP_UP.search(result.stdout) is not None
