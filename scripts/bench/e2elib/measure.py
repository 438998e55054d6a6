"""The backends, their frontends and the turns: starting virtio-netd, the DPDK backend (dpdk-testpmd
with net_vhost0 + net_tap0, io forwarding) and a virtio-user frontend (dpdk-testpmd) for each; the
idle windows; one turn of a backend (tx or rx) or of a ceiling (tap-read, tap-write); stopping them
all in order. Each measured turn is added to a Results; a failed one is recorded as failed, its logs
are shown and the run goes on."""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from dataclasses import dataclass, field

from . import counters, stats
from .counters import CounterError, TapCounters
from .host import Fatal, Namespace, free_hugepages
from .options import Options
from .processes import Child, ProcessTable, run, say, wait_for
from .results import FailedTurn, Results, Turn
from .schedule import BACKENDS
from .testpmd import PortStats, Testpmd

FRONTEND_MAC = "52:54:00:00:00:01"
METRICS_PORT = 9464
SETTLE_POLLS = 30  # settle: at most 30 x 0.1 s
LOG_TAIL_LINES = 25
SPIN = ["taskset", "-c", "1", "bash", "-c", "while :; do :; done"]  # stands in for the frontend's polling

_FETCH_METRICS = f"""
import socket, sys
s = socket.create_connection(("127.0.0.1", {METRICS_PORT}), timeout=5)
s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.decode(errors="replace"))
"""


# DPDK's --file-prefix of the run's testpmd: the DPDK backend, the frontends of virtio-netd and DPDK.
FILE_PREFIX_ROLES = ("b", "fvn", "fdpdk")


def file_prefix(run_id: str, role: str) -> str:
    return f"{run_id}-{role}"


class TurnFailed(Exception):
    """A measurement could not be made: the message and the logs that may say why."""

    def __init__(self, message: str, logs: list[str]):
        super().__init__(message)
        self.logs = logs


@dataclass
class Backend:
    name: str  # "virtio-netd" or "dpdk"
    tap: str
    socket: str
    log: str
    child: Child | None = None
    control: Testpmd | None = None  # the DPDK backend's command channel
    frontend: Testpmd | None = None
    gone: bool = False  # it or its frontend has ended: its remaining turns are skipped


@dataclass
class Snapshot:
    """Taken at each end of a window. tap: the TAP's counters, t: the time in the middle of reading
    them; cpu: the measured process's ticks; ours: the benchmark's processes; by: the bystanders
    (processes that should be idle); busy: the whole machine's; fe: the frontend's port statistics."""
    tap: TapCounters
    t: float
    cpu: int
    ours: int
    by: int
    busy: float
    fe: PortStats | None = None


@dataclass
class Bench:
    options: Options
    work: str
    namespace: Namespace
    processes: ProcessTable
    tools: dict[str, str]
    daemon: str
    hugepages_mount: str
    run_id: str
    started: float
    hz: int = field(default_factory=lambda: os.sysconf("SC_CLK_TCK"))
    cores: int = field(default_factory=lambda: os.sysconf("SC_NPROCESSORS_ONLN"))
    results: Results = field(default_factory=Results)
    failures: list[str] = field(default_factory=list)
    instance: int = 0
    backends: dict[str, Backend] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in BACKENDS:
            short = "vn" if name == "virtio-netd" else name
            self.backends[name] = Backend(name, tap=f"e2e-{short}", socket=os.path.join(self.work, f"{name}.sock"),
                                          log=os.path.join(self.work, f"{name}.log"))

    # ---- helpers -----------------------------------------------------------------------------------

    def elapsed(self) -> int:
        return int(time.monotonic() - self.started)

    def since_start(self, t: float) -> float:
        return t - self.started

    def show_logs(self, logs: list[str]) -> None:
        for path in logs:
            if not os.path.isfile(path):
                continue
            name = os.path.relpath(path, self.work) if path.startswith(self.work + "/") else path
            print(f"----- last lines of {name} -----", file=sys.stderr)
            with open(path, errors="replace") as f:
                print("".join(f.readlines()[-LOG_TAIL_LINES:]), end="", file=sys.stderr, flush=True)

    def fail(self, message: str, logs: list[str]) -> None:
        """Records a failed measurement and shows the logs."""
        self.failures.append(message)
        say(f"FAILED: {message}")
        self.show_logs(logs)

    def long_pids(self) -> list[int]:
        """The four that run throughout: both backends and both frontends."""
        pids = []
        for backend in self.backends.values():
            for child in (backend.child, backend.frontend.child if backend.frontend else None):
                if child is not None:
                    pids.append(child.pid)
        return pids

    def other(self, backend: Backend) -> Backend:
        return self.backends["dpdk" if backend.name == "virtio-netd" else "virtio-netd"]

    def bystanders(self, backend: Backend) -> list[int]:
        """The run's other backend and its frontend (stopped during this backend's turns)."""
        other = self.other(backend)
        return [c.pid for c in (other.child, other.frontend.child if other.frontend else None) if c is not None]

    def snapshot(self, tap: str, measured: int, extra: list[int], bystanders: list[int],
                 frontend: Testpmd | None = None, what: str = "") -> Snapshot:
        fe = None
        if frontend is not None:
            fe = frontend.port_stats()
            if fe is None:
                raise TurnFailed(f"{what}: the frontend did not answer", [])
        ta = time.monotonic()
        tap_now = self.namespace.counters(tap)
        tb = time.monotonic()
        return Snapshot(tap=tap_now, t=(ta + tb) / 2, cpu=counters.cpu_ticks([measured]),
                        ours=counters.cpu_ticks(self.long_pids() + extra), by=counters.cpu_ticks(bystanders),
                        busy=counters.busy_ticks(self.cores, self.hz), fe=fe)

    def window(self, s0: Snapshot, s1: Snapshot, frames: int) -> tuple[float, float, float, float]:
        """(window seconds, measured CPU s per Mframe, other CPU s, idle procs CPU s)."""
        return (s1.t - s0.t, stats.cpu_seconds_per_mframe(s1.cpu - s0.cpu, self.hz, frames),
                stats.other_cpu_seconds(s1.busy - s0.busy, s1.ours - s0.ours, self.hz), (s1.by - s0.by) / self.hz)

    def settle(self, tap: str) -> None:
        """Waits (at most 3 s) until the TAP's counters stop moving: the traffic has drained."""
        previous = self.namespace.counters(tap)
        for _ in range(SETTLE_POLLS):
            time.sleep(0.1)
            current = self.namespace.counters(tap)
            if current == previous:
                return
            previous = current

    def next_instance(self) -> int:
        self.instance += 1
        return self.instance

    def start_generator(self, tap: str, size: int, seconds: int) -> Child:
        """tap-flood on core 1 into TAP."""
        log = os.path.join(self.work, f"tap-flood-{self.next_instance()}-{tap}-{size}.log")
        args = ["-i", tap, "-d", FRONTEND_MAC, "-s", str(size), "-t", str(seconds), "-w", str(self.options.backoff)]
        return self.processes.start(
            self.namespace.exec_command(["taskset", "-c", "1", self.tools["tap-flood"], *args]), "tap-flood", log,
            header=f"+ ip netns exec {self.namespace.name} taskset -c 1 tap-flood {' '.join(args)}")

    def stop(self, child: Child | None, signo: int = signal.SIGTERM) -> None:
        if child is not None:
            self.processes.stop(child, signo)

    # ---- backends and frontends --------------------------------------------------------------------

    def start_backend(self, name: str) -> bool:
        """Starts it and waits for its socket, its TAP (up) in the namespace and, for DPDK, its prompt."""
        b = self.backends[name]
        ns = self.namespace.name
        if name == "virtio-netd":
            config = os.path.join(self.work, "virtio-netd.toml")
            text = (f'[daemon]\nlog_level = "warning"\nmetrics = "127.0.0.1:{METRICS_PORT}"\n\n'
                    f'[[device]]\nname = "bench"\nsocket = "{b.socket}"\ntap = "{b.tap}"\nqueue_pairs = 1\n'
                    f'mac = "{FRONTEND_MAC}"\n')
            with open(config, "w") as f:
                f.write(text)
            header = f"+ ip netns exec {ns} taskset -c 0 {self.daemon} --config {config}\n" + "".join(
                f"  {line}\n" for line in text.splitlines())
            b.child = self.processes.start(
                self.namespace.exec_command(["taskset", "-c", "0", self.daemon, "--config", config]),
                "virtio-netd", b.log, header=header)
        else:
            # Started without forwarding (no --auto-start): its ports are up, its forwarding lcore waits
            # until its turn.
            command = ["dpdk-testpmd", "-l", "0,1", "--main-lcore", "1", "--no-pci", "--in-memory", "-m", "256",
                       "--huge-dir", self.hugepages_mount, "--file-prefix", file_prefix(self.run_id, "b"),
                       "--vdev", f"net_vhost0,iface={b.socket},queues=1", "--vdev", f"net_tap0,iface={b.tap}",
                       "--", "-i", "--forward-mode=io", "--nb-cores=1"]
            b.child = self.processes.start(
                self.namespace.exec_command(["stdbuf", "-oL", *command]), "the DPDK backend", b.log, stdin_pipe=True,
                header=f"+ ip netns exec {ns} stdbuf -oL {' '.join(command)} <COMMAND-PIPE")
            b.control = Testpmd(b.child, "the DPDK backend")
        return (wait_for(f"{name}'s socket {b.socket}", 30, b.child, lambda: _is_socket(b.socket))
                and wait_for(f"{name}'s TAP {b.tap} (up) in {ns}", 30, b.child, lambda: self.namespace.tap_is_up(b.tap))
                and (b.control is None or b.control.wait_for_prompt(30)))

    def start_frontend(self, name: str) -> bool:
        """A frontend connected to backend NAME's socket, its forwarding stopped."""
        b = self.backends[name]
        short = "vn" if name == "virtio-netd" else name
        log = os.path.join(self.work, f"frontend-{name}.log")
        command = ["dpdk-testpmd", "-l", "0,1", "--main-lcore", "0", "--no-pci", "--in-memory",
                   "--single-file-segments", "-m", "256", "--huge-dir", self.hugepages_mount,
                   "--file-prefix", file_prefix(self.run_id, f"f{short}"),
                   "--vdev", f"net_virtio_user0,path={b.socket},queues=1,mac={FRONTEND_MAC}",
                   "--", "-i", "--forward-mode=rxonly", "--nb-cores=1"]
        child = self.processes.start(["stdbuf", "-oL", *command], f"the frontend of {name}", log, stdin_pipe=True,
                                     header=f"+ stdbuf -oL {' '.join(command)} <COMMAND-PIPE")
        b.frontend = Testpmd(child, f"the frontend of {name}")
        return b.frontend.wait_for_prompt(60)

    def start_all(self) -> None:
        say("starting virtio-netd, the DPDK backend and a frontend for each")
        free_before = free_hugepages()
        for name, b in self.backends.items():
            if not self.start_backend(name):
                self.fail(f"{name}: the backend did not come up", [b.log])
                raise Fatal("stopping: a backend did not come up")
        for name, b in self.backends.items():
            if not self.start_frontend(name):
                assert b.frontend is not None
                self.fail(f"{name}: its frontend did not come up", [b.log, b.frontend.log])
                raise Fatal("stopping: a frontend did not come up")
        say(f"  up; hugepages taken by the three testpmd: {free_before - free_hugepages()} (2 MiB each)")
        labels = {"virtio-netd": "virtio-netd", "dpdk": "DPDK backend"}
        for name, b in self.backends.items():
            assert b.child is not None
            say(f"  threads (name:allowed cores): {labels[name]} {counters.affinity(b.child.pid)}")
        for name, b in self.backends.items():
            assert b.frontend is not None
            label = "virtio-netd" if name == "virtio-netd" else "DPDK"
            say(f"  threads (name:allowed cores): frontend of {label} {counters.affinity(b.frontend.child.pid)}")

    def stop_all(self) -> None:
        """The frontends and the DPDK backend quit (or are stopped), then virtio-netd is stopped."""
        for b in self.backends.values():
            if b.frontend is not None:
                b.frontend.quit()
                self.stop(b.frontend.child)
        dpdk = self.backends["dpdk"]
        if dpdk.control is not None:
            dpdk.control.quit()
        self.stop(dpdk.child)
        self.stop(self.backends["virtio-netd"].child)

    def virtio_netd_drops(self) -> None:
        b = self.backends["virtio-netd"]
        if b.child is None or not b.child.alive():
            return
        result = run(self.namespace.exec_command([sys.executable, "-c", _FETCH_METRICS]), check=False, timeout=15)
        drops = counters.nonzero_drop_counters(result.stdout)
        say(f"virtio-netd drop counters (metrics endpoint, whole run): {drops or 'none'}")

    # ---- measurements ------------------------------------------------------------------------------

    def measure_idle(self, name: str) -> None:
        """The backend's CPU over one window, its frontend connected, no traffic; the DPDK backend's
        forwarding started for its own window (its polling is what it costs) and stopped otherwise."""
        b = self.backends[name]
        assert b.child is not None and b.frontend is not None
        other = self.other(b)
        labels = {}
        if other.child is not None:
            labels[other.child.pid] = "virtio-netd" if other.name == "virtio-netd" else "DPDK backend (stopped)"
        if other.frontend is not None:
            labels[other.frontend.child.pid] = ("virtio-netd's frontend (stopped)" if other.name == "virtio-netd"
                                                else "DPDK's frontend (stopped)")
        labels[b.frontend.child.pid] = ("virtio-netd's frontend (stopped)" if name == "virtio-netd"
                                        else "DPDK's frontend (stopped)")
        if b.control is not None and not b.control.command("start"):
            self.fail("dpdk idle: the DPDK backend did not start forwarding", [b.log])
            return
        time.sleep(self.options.warmup)
        t0, c0 = time.monotonic(), counters.cpu_ticks([b.child.pid])
        o0 = {pid: counters.cpu_ticks([pid]) for pid in labels}
        time.sleep(self.options.seconds)
        t1, c1 = time.monotonic(), counters.cpu_ticks([b.child.pid])
        o1 = {pid: counters.cpu_ticks([pid]) for pid in labels}
        if b.control is not None and not b.control.command("stop"):
            self.fail("dpdk idle: the DPDK backend did not stop forwarding", [b.log])
            return
        percent = stats.percent_of_core(c1 - c0, self.hz, t1 - t0)
        detail = ", ".join(f"{label} {stats.percent_of_core(o1[pid] - o0[pid], self.hz, t1 - t0):.1f} %"
                           for pid, label in labels.items())
        say(f"  idle {name}: backend CPU {percent:.1f} % of a core; meanwhile {detail}")
        self.results.add_idle(name, percent)

    def measure_tx(self, b: Backend, pair: int, size: int) -> Turn:
        """guest -> TAP. Counted: the TAP's rx_packets/rx_bytes over the window. "lost": frames the
        frontend put in the ring (its TX-packets) that never reached the TAP, from before the traffic
        started until it had drained (exact: no counter moves at either end)."""
        fe = b.frontend
        assert fe is not None and b.child is not None
        what = f"{b.name} pair {pair} tx {size} B"
        logs = [b.log, fe.log]
        try:
            fe.send("stop", "set fwd txonly", f"set txpkts {size}")
            pre_fe = fe.port_stats()
            if pre_fe is None:
                raise TurnFailed(f"{what}: the frontend did not answer", logs)
            pre_tap = self.namespace.counters(b.tap)
            fe.send("start")
            time.sleep(self.options.warmup)
            s0 = self.snapshot(b.tap, b.child.pid, [], self.bystanders(b), fe, what)
            time.sleep(self.options.seconds)
            s1 = self.snapshot(b.tap, b.child.pid, [], self.bystanders(b), fe, what)
            if not fe.command("stop"):
                raise TurnFailed(f"{what}: the frontend did not stop", logs)
            self.settle(b.tap)
            post_fe = fe.port_stats()
            if post_fe is None:
                raise TurnFailed(f"{what}: the frontend did not answer", logs)
            post_tap = self.namespace.counters(b.tap)
        except TurnFailed as failure:
            raise TurnFailed(str(failure), logs) from None
        frames = s1.tap.rx_packets - s0.tap.rx_packets
        frame_bytes = s1.tap.rx_bytes - s0.tap.rx_bytes
        dropped = s1.tap.rx_dropped - s0.tap.rx_dropped
        put = post_fe.tx_packets - pre_fe.tx_packets
        arrived = post_tap.rx_packets - pre_tap.rx_packets
        if frames <= 0:
            raise TurnFailed(f"{what}: no frame reached the TAP in {self.options.seconds} s "
                             f"(the frontend put {put} in the ring)", logs)
        seconds, cpu, other, idle = self.window(s0, s1, frames)
        mpps = stats.per_second_millions(frames, seconds)
        gbps = stats.gbit_per_second(frame_bytes, seconds)
        lost = stats.lost_percent(put, arrived)
        say("  %-14s tx %4d B: %.3f Mpps %.3f Gbit/s, backend %.3f CPU s/Mframe; turn: frontend put %d in the ring, "
            "TAP got %d (%.2f %% lost); TAP rx_dropped %d in the window; other CPU %.2f s, idle procs %.2f s"
            % (b.name, size, mpps, gbps, cpu, put, arrived, lost, dropped, other, idle))
        return Turn("tx", size, b.name, pair, self.since_start((s0.t + s1.t) / 2), mpps, gbps, cpu, other, lost,
                    dropped, None, idle)

    def measure_rx(self, b: Backend, pair: int, size: int) -> Turn:
        """TAP -> guest. Counted: the frontend's RX-packets between two "show port stats" (Rx-pps and
        Rx-bps are testpmd's own rates over exactly that interval). "lost": frames the backend read
        from the TAP (its tx_packets) that the frontend never received, from before the generator
        started until the traffic had drained."""
        fe = b.frontend
        assert fe is not None and b.child is not None
        what = f"{b.name} pair {pair} rx {size} B"
        logs = [b.log, fe.log]
        generator = None
        try:
            fe.send("stop", "set fwd rxonly", "start")
            pre_fe = fe.port_stats()
            if pre_fe is None:
                raise TurnFailed(f"{what}: the frontend did not answer", logs)
            pre_tap = self.namespace.counters(b.tap)
            generator = self.start_generator(b.tap, size, self.options.warmup + self.options.seconds + 10)
            assert generator.log is not None
            logs.append(generator.log)
            time.sleep(self.options.warmup)
            s0 = self.snapshot(b.tap, b.child.pid, [generator.pid], self.bystanders(b), fe, what)
            time.sleep(self.options.seconds)
            s1 = self.snapshot(b.tap, b.child.pid, [generator.pid], self.bystanders(b), fe, what)
            self.stop(generator, signal.SIGINT)
            self.settle(b.tap)
            post_fe = fe.port_stats()
            if post_fe is None:
                raise TurnFailed(f"{what}: the frontend did not answer", logs)
            post_tap = self.namespace.counters(b.tap)
            if not fe.command("stop"):
                raise TurnFailed(f"{what}: the frontend did not stop", logs)
        except TurnFailed as failure:
            raise TurnFailed(str(failure), logs) from None
        finally:
            if generator is not None and generator in self.processes.children:
                self.stop(generator)
        assert s0.fe is not None and s1.fe is not None
        frames = s1.fe.rx_packets - s0.fe.rx_packets
        read_frames = s1.tap.tx_packets - s0.tap.tx_packets
        dropped = s1.tap.tx_dropped - s0.tap.tx_dropped
        taken = post_tap.tx_packets - pre_tap.tx_packets
        delivered = post_fe.rx_packets - pre_fe.rx_packets
        if frames <= 0:
            raise TurnFailed(f"{what}: the frontend received no frame in {self.options.seconds} s "
                             f"(the backend read {read_frames} from the TAP)", logs)
        seconds, cpu, other, idle = self.window(s0, s1, frames)
        mpps = s1.fe.rx_pps / 1e6
        gbps = s1.fe.rx_bps / 1e9
        lost = stats.lost_percent(taken, delivered)
        offered = stats.per_second_millions(read_frames + dropped, seconds)
        say("  %-14s rx %4d B: %.3f Mpps %.3f Gbit/s, backend %.3f CPU s/Mframe; window: backend read %.3f Mpps "
            "from the TAP, TAP tx_dropped %d; turn: backend read %d, frontend got %d (%.2f %% lost); other CPU "
            "%.2f s, idle procs %.2f s"
            % (b.name, size, mpps, gbps, cpu, stats.per_second_millions(read_frames, seconds), dropped, taken,
               delivered, lost, other, idle))
        return Turn("rx", size, b.name, pair, self.since_start((s0.t + s1.t) / 2), mpps, gbps, cpu, other, lost,
                    dropped, offered, idle)

    def measure_rx_ceiling(self, pair: int, size: int) -> Turn:
        """The TAP-to-guest ceiling: tap-read on core 0 reading from a TAP of its own, fed by the
        generator on core 1, with a busy loop on core 1 in place of the frontend's polling. Counted:
        the TAP's tx_packets."""
        instance = self.next_instance()
        tap = f"e2e-c{instance}"
        what = f"ceiling pair {pair} rx {size} B"
        log = os.path.join(self.work, f"tap-read-{instance}.log")
        reader = spin = generator = None
        try:
            reader = self.processes.start(
                self.namespace.exec_command(["taskset", "-c", "0", self.tools["tap-read"], "-i", tap]), "tap-read", log,
                header=f"+ ip netns exec {self.namespace.name} taskset -c 0 tap-read -i {tap}")
            if not wait_for(f"tap-read on {tap}", 10, reader, lambda: "ready on" in _read(log)):
                raise TurnFailed(f"{what}: tap-read did not start", [log])
            spin = self.processes.start(SPIN, "busy loop")
            generator = self.start_generator(tap, size, self.options.warmup + self.options.seconds + 5)
            time.sleep(self.options.warmup)
            mine = [reader.pid, spin.pid, generator.pid]
            s0 = self.snapshot(tap, reader.pid, mine, self.long_pids())
            time.sleep(self.options.seconds)
            s1 = self.snapshot(tap, reader.pid, mine, self.long_pids())
            self.stop(generator, signal.SIGINT)
            self.stop(spin)
            self.stop(reader, signal.SIGINT)
        finally:
            for child in (generator, spin, reader):
                if child is not None and child in self.processes.children:
                    self.stop(child)
        assert generator.log is not None
        frames = s1.tap.tx_packets - s0.tap.tx_packets
        frame_bytes = s1.tap.tx_bytes - s0.tap.tx_bytes
        dropped = s1.tap.tx_dropped - s0.tap.tx_dropped
        if frames <= 0:
            raise TurnFailed(f"{what}: tap-read read no frame in {self.options.seconds} s", [log, generator.log])
        seconds, cpu, other, idle = self.window(s0, s1, frames)
        mpps = stats.per_second_millions(frames, seconds)
        gbps = stats.gbit_per_second(frame_bytes, seconds)
        offered = stats.per_second_millions(frames + dropped, seconds)
        say("  %-14s rx %4d B: %.3f Mpps %.3f Gbit/s, reader %.3f CPU s/Mframe; TAP tx_dropped %d; other CPU %.2f s, "
            "idle procs %.2f s" % ("read() ceiling", size, mpps, gbps, cpu, dropped, other, idle))
        return Turn("rx", size, "ceiling", pair, self.since_start((s0.t + s1.t) / 2), mpps, gbps, cpu, other, 0.0,
                    dropped, offered, idle)

    def measure_tx_ceiling(self, pair: int, size: int, mode: str) -> Turn:
        """The guest-to-TAP ceilings: tap-write (MODE uring or writev) on core 0 writing into a TAP of
        its own, a busy loop on core 1 in place of the frontend's polling. Counted: the TAP's
        rx_packets."""
        instance = self.next_instance()
        tap = f"e2e-c{instance}"
        what = f"{mode} ceiling pair {pair} tx {size} B"
        log = os.path.join(self.work, f"tap-write-{instance}.log")
        writer = spin = None
        try:
            spin = self.processes.start(SPIN, "busy loop")
            args = ["-i", tap, "-s", str(size), "-m", mode]
            writer = self.processes.start(
                self.namespace.exec_command(["taskset", "-c", "0", self.tools["tap-write"], *args]), "tap-write", log,
                header=f"+ ip netns exec {self.namespace.name} taskset -c 0 tap-write {' '.join(args)}")
            if not wait_for(f"tap-write on {tap}", 10, writer, lambda: "ready on" in _read(log)):
                raise TurnFailed(f"{what}: tap-write did not start", [log])
            time.sleep(self.options.warmup)
            mine = [writer.pid, spin.pid]
            s0 = self.snapshot(tap, writer.pid, mine, self.long_pids())
            time.sleep(self.options.seconds)
            s1 = self.snapshot(tap, writer.pid, mine, self.long_pids())
            self.stop(writer, signal.SIGINT)
            self.stop(spin)
        finally:
            for child in (writer, spin):
                if child is not None and child in self.processes.children:
                    self.stop(child)
        frames = s1.tap.rx_packets - s0.tap.rx_packets
        frame_bytes = s1.tap.rx_bytes - s0.tap.rx_bytes
        dropped = s1.tap.rx_dropped - s0.tap.rx_dropped
        if frames <= 0:
            raise TurnFailed(f"{what}: no frame reached the TAP in {self.options.seconds} s", [log])
        seconds, cpu, other, idle = self.window(s0, s1, frames)
        mpps = stats.per_second_millions(frames, seconds)
        gbps = stats.gbit_per_second(frame_bytes, seconds)
        say("  %-14s tx %4d B: %.3f Mpps %.3f Gbit/s, writer %.3f CPU s/Mframe; TAP rx_dropped %d; other CPU %.2f s, "
            "idle procs %.2f s" % (f"{mode} ceiling", size, mpps, gbps, cpu, dropped, other, idle))
        return Turn("tx", size, f"ceiling-{mode}", pair, self.since_start((s0.t + s1.t) / 2), mpps, gbps, cpu, other,
                    0.0, dropped, None, idle)

    # ---- turns -------------------------------------------------------------------------------------

    def turn(self, case: str, size: int, pair: int, member: str) -> None:
        """One turn. For a backend: its frontend (and, for DPDK, its forwarding) runs only for the turn
        and is stopped again whatever happened. A failed turn is recorded as failed."""
        result: Turn | None = None
        try:
            if member in self.backends:
                result = self.backend_turn(case, size, pair, self.backends[member])
            elif member == "ceiling":
                result = self.measure_rx_ceiling(pair, size)
            else:
                result = self.measure_tx_ceiling(pair, size, member.removeprefix("ceiling-"))
        except (TurnFailed, CounterError) as failure:
            self.fail(str(failure), getattr(failure, "logs", []))
        if result is not None:
            self.results.add(result)
        else:
            self.results.add(FailedTurn(case, size, member, pair, self.since_start(time.monotonic())))

    def backend_turn(self, case: str, size: int, pair: int, b: Backend) -> Turn | None:
        if b.gone:
            return None
        assert b.child is not None and b.frontend is not None
        if not b.child.alive() or not b.frontend.child.alive():
            b.gone = True
            self.fail(f"{b.name}: the backend or its frontend has ended (before pair {pair} of {case} {size} B); "
                      "its remaining turns are skipped", [b.log, b.frontend.log])
            return None
        what = f"{b.name} pair {pair} {case} {size} B"
        try:
            if b.control is not None and not b.control.command("start"):
                raise TurnFailed(f"{what}: the DPDK backend did not start forwarding", [b.log])
            if case == "tx":
                result = self.measure_tx(b, pair, size)
            else:
                result = self.measure_rx(b, pair, size)
        except (TurnFailed, CounterError):
            # The measurement stopped half-way: make sure nothing keeps polling.
            b.frontend.command("stop")
            if b.control is not None:
                b.control.command("stop")
            raise
        if b.control is not None and not b.control.command("stop"):
            self.fail(f"{what}: the DPDK backend did not stop forwarding", [b.log])
        return result


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""
