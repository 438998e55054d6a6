"""The end-to-end benchmark's driver (scripts/bench/e2e), stdlib only. One module per concern:

    options    the command line
    processes  children (own process groups), stopping them (signal, SIGKILL after 5 s), waiting, signals
    host       prerequisites, builds, hugepages, the hugetlbfs mount, the network namespace, the work directory
    testpmd    driving an interactive dpdk-testpmd through its stdin and its log
    counters   /proc: CPU ticks, the machine's busy time, TAP counters, affinities, metrics
    schedule   the members of each case and the palindromic order of their turns
    measure    the backends, frontends, idle windows and turns
    stats      the arithmetic: rates, CPU per frame, medians, paired and nearest-ceiling ratios
    results    what a run records
    report     the text and Markdown tables
    main       the run from start to end, and its cleanup

options, schedule, stats, report and the parsers in counters and testpmd are pure and unit-tested
(test_*.py: python3 -m unittest discover -s scripts/bench).
"""
