"""Benchmarks of the depsep kernels against PyTorch eager and torch.compile: `python -m bench`.

Layout: shapes.py holds the MobileNet V1 layer, block and model tables; harness.py the one
measurement harness (correctness gate, timing, memory, the torch.compile baselines); one module
per op its cases, runners and minimum-bytes formulas (depthwise.py; bn_act.py for
depthwise_bn_act and pointwise_bn_act; block.py; model.py, whole networks: MobileNet V1 or any
timm / torchvision model); __main__.py the command line and each device's default suite;
report.py the terminal tables, results.csv and summary.md, and plots.py one PNG per op, all
written to --out.
"""
