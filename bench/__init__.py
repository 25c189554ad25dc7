"""Microbenchmarks of the depsep kernels against PyTorch (SPEC §6); run `python -m bench --help`.

Layout: shapes.py holds the MobileNet V1 layer tables, harness.py the one measurement harness
(correctness gate, timing), one module per op (depthwise.py, ...) its cases and runners, and
report.py the terminal tables, results.csv and summary.md written to --out.
"""
