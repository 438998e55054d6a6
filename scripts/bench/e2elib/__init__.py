"""The end-to-end benchmark's statistics and tables, stdlib only. One module per concern:

    options    the command line
    schedule   the members of each case and the palindromic order of their turns
    stats      the arithmetic: rates, CPU per frame, medians, paired and nearest-ceiling ratios
    results    what a run records
    report     the text and Markdown tables

All are pure and unit-tested (test_*.py: python3 -m unittest discover -s scripts/bench).
"""
