"""The run from start to end: the command line, prerequisites and builds, the machine's set-up, the
four long-running processes, the idle windows, the turns in schedule order, the tables; and the
cleanup, which runs whatever happened (an error, Ctrl-C, SIGTERM)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import traceback

from . import options as cli
from .host import (Cleanup, Fatal, Namespace, build_virtio_netd, check_prerequisites,
                   compile_tools, ensure_hugepages, make_work_directory, mount_hugetlbfs,
                   remove_dpdk_runtime_directories)
from .measure import FILE_PREFIX_ROLES, FRONTEND_MAC, Bench, file_prefix
from .processes import Interrupted, ProcessTable, ignore_signals, install_signal_handlers, say
from .report import Settings, markdown_report, text_report
from .schedule import MEMBERS, schedule


def _banner(options: cli.Options, namespace: str, work: str) -> None:
    sizes = " ".join(str(s) for s in options.sizes)
    cases = " ".join(options.cases)
    print(f"""e2e: pinning (2 cores); all four started once, only the turn's backend and frontend forward, the others are stopped:
e2e:   core 0: backends. (a) ip netns exec {namespace} taskset -c 0 virtio-netd (every thread);
e2e:           (b) dpdk-testpmd -l 0,1 --main-lcore 1: forwarding lcore 0 (polls during its turns, "stop"ped otherwise), main lcore 1 (idle, waits for commands)
e2e:           ceilings: taskset -c 0 tap-read (rx), taskset -c 0 tap-write (tx)
e2e:   core 1: frontends dpdk-testpmd -l 0,1 --main-lcore 0, one per backend: forwarding lcore 1 (polls during its turns); main lcore 0 only waits for commands
e2e:           generator: taskset -c 1 tap-flood (rx); ceilings: a busy loop on core 1 stands in for the frontend's polling
e2e: namespace {namespace}; frontend MAC {FRONTEND_MAC}; frames {sizes} B; cases {cases}; tap-flood -w {options.backoff}
e2e: {options.rounds} pairs of turns per case and size, in the order of the members, then the reverse, alternating:""",
          file=sys.stderr, flush=True)
    for case in ("tx", "rx"):
        if case in options.cases:
            say(f"  {case}: {' > '.join(MEMBERS[case])}")
    say(f"{options.warmup} s warm-up + {options.seconds} s window per turn; work directory {work}")


def _run(options: cli.Options, here: str, repo: str, cleanup: Cleanup, processes: ProcessTable) -> int:
    started = time.monotonic()
    run_id = f"e2e{os.getpid()}"
    work = make_work_directory(cleanup, "hugepages")
    os.chdir(work)  # nothing written by accident lands elsewhere
    daemon = build_virtio_netd(repo, work)
    tools = compile_tools(here, work)
    ensure_hugepages(cleanup)
    hugepages_mount = os.path.join(work, "hugepages")
    mount_hugetlbfs(hugepages_mount, cleanup)
    remove_dpdk_runtime_directories(cleanup, [file_prefix(run_id, role) for role in FILE_PREFIX_ROLES])
    namespace = Namespace(f"e2e-bench-{os.getpid()}", processes, cleanup)
    _banner(options, namespace.name, work)

    bench = Bench(options=options, work=work, namespace=namespace, processes=processes, tools=tools, daemon=daemon,
                  hugepages_mount=hugepages_mount, run_id=run_id, started=started)
    bench.start_all()
    for name in bench.backends:
        bench.measure_idle(name)
    for pair in schedule(options.cases, options.sizes, options.rounds):
        say(f"{pair.case} {pair.size} B, pair {pair.pair}/{options.rounds}: {' '.join(pair.order)} ({bench.elapsed()} s)")
        for member in pair.order:
            bench.turn(pair.case, pair.size, pair.pair, member)
    bench.virtio_netd_drops()
    bench.stop_all()

    settings = Settings(rounds=options.rounds, seconds=options.seconds, warmup=options.warmup, backoff=options.backoff,
                        sizes=options.sizes, cases=options.cases, sizes_text=options.sizes_text,
                        cases_text=options.cases_text, cores=bench.cores)
    sys.stdout.write(text_report(bench.results, settings))
    sys.stdout.flush()
    if options.markdown:
        with open(options.markdown, "w") as f:
            f.write(markdown_report(bench.results, settings))
        say(f"Markdown written to {options.markdown}")

    say(f"finished in {bench.elapsed()} s")
    if bench.failures:
        say(f"{len(bench.failures)} measurement(s) failed:")
        for message in bench.failures:
            say(f"  {message}")
        return 1
    return 0


def main(argv: list[str], usage: str) -> int:
    try:
        options = cli.parse(argv)
    except cli.HelpRequested:
        try:
            print(usage.strip("\n"), flush=True)
        except BrokenPipeError:  # e2e --help | head
            sys.stdout = None  # type: ignore[assignment]  # nothing more to flush at exit
        return 0
    except cli.UsageError as error:
        print(f"e2e: {error}", file=sys.stderr)
        return 2

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # scripts/bench: the C tools
    repo = os.path.dirname(os.path.dirname(here))
    install_signal_handlers()
    cleanup = Cleanup()
    processes = ProcessTable()
    status = 1
    try:
        check_prerequisites(repo)
        if options.markdown:
            options = dataclasses.replace(options, markdown=_markdown_path(options.markdown))
        status = _run(options, here, repo, cleanup, processes)
    except Interrupted:
        say("interrupted: cleaning up")
        status = 130
    except Fatal as error:
        say(str(error))
    except Exception:
        traceback.print_exc()
        say("stopped by an unexpected error (above); cleaning up")
    finally:
        ignore_signals()
        processes.stop_all()
        cleanup.run()
    return status


def _markdown_path(path: str) -> str:
    """The absolute path of --markdown FILE, emptied now so that a bad path fails before the run."""
    absolute = os.path.abspath(path)
    if not os.path.isdir(os.path.dirname(absolute)):
        raise Fatal(f"--markdown: no directory for {path}")
    try:
        open(absolute, "w").close()
    except OSError:
        raise Fatal(f"cannot write {absolute}") from None
    return absolute

