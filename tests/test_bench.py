"""`python -m bench --quick` runs every op and mode of the suite on the CPU and writes its files;
the correctness gate reports a wrong backend instead of timing it."""

import csv
import dataclasses

import pytest
import torch

from bench.__main__ import OPS, main
from bench.harness import Deadline, Timing, measure_saved, run_case

# Backends by what they keep for backward, most first.
CHAIN_ORDER = ("torch", "native-unchained", "native", "native-recompute-all")


def test_quick_run_writes_checked_results(tmp_path, capsys):
    threads = torch.get_num_threads()
    main(["--quick", "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # --quick ran on one thread, then restored it
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([*(f"{op}.png" for op in OPS), "results.csv", "summary.md"])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    times = [r for r in rows if r["metric"] == "time"]
    for op in OPS.values():
        torch_times = [r for r in times if r["op"] == op.name and r["backend"] == "torch"]
        assert {(r["mode"], r["layout"]) for r in torch_times} == {
            (mode, layout) for mode in op.modes for layout in ("channels_last", "nchw")
        }, op.name
        assert all(float(r["median"]) > 0 for r in torch_times)
    native = [r for r in times if r["op"] == "depthwise" and r["backend"] == "native"]
    assert {r["mode"] for r in native} == set(OPS["depthwise"].modes)
    model = {r["metric"] for r in rows if r["op"] == "model" and r["backend"] == "torch"}
    assert {"throughput", "step_memory", "saved_memory"} <= model
    # The chain variants beside the default chains, in training; what each keeps for backward
    # is in the order of what it recomputes.
    for op in ("block", "model"):
        saved = {
            (r["backend"], r["layout"]): float(r["median"])
            for r in rows
            if r["op"] == op and r["metric"] == "saved_memory"
        }
        for layout in ("channels_last", "nchw"):
            kept = [saved[b, layout] for b in CHAIN_ORDER]
            assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1], (op, layout, kept)
    out = capsys.readouterr().out
    assert "WRONG" not in out
    assert "not in --quick" in out  # the compile baselines say why they did not run


def test_saved_memory_counts_each_saved_storage_once_but_no_parameter():
    weight = torch.nn.Parameter(torch.randn(64, dtype=torch.float64))
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)

    def step():
        h = x * 2  # saves nothing of its own: a constant factor
        # h, a view of h twice, and the parameter's view
        y = (h * weight).sum() + (h[:32] * h[:32]).sum() + (h @ weight[None].t()).sum()
        y.backward()

    assert measure_saved(step) == 64 * 8


def test_a_wrong_backend_is_reported_not_timed():
    op = OPS["pointwise_bn_act"]
    case = op.make_case(op.quick_layers[0], 2, torch.float32, "channels_last", "eval")

    def runner_with_a_bug(case, inputs, backend):
        runner = op.make_runner(case, inputs, "torch")
        if backend == "torch":
            return runner
        return lambda: {"output": runner()["output"] * 1.01}

    timed = []

    def time_fn(fn):
        timed.append(fn)
        return Timing(1e-3, 1e-3, 1e-3)

    results = run_case(
        dataclasses.replace(op, make_runner=runner_with_a_bug),
        case,
        ["torch", "native"],
        torch.device("cpu"),
        {"native": None},
        time_fn,
        Deadline(None),
    )
    assert [r.status for r in results] == ["ok", "wrong"]
    assert len(timed) == 1
    assert "output" in results[1].detail


def test_model_benchmark_takes_timm_and_torchvision_networks(tmp_path, capsys):
    """--model: any timm or torchvision network, converted, checked against the original and
    timed beside it; the tables say how much of it convert() fused."""
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    nets = ["timm:mobilenetv2_035", "torchvision:mobilenet_v3_small"]
    argv = ["--quick", "--ops", "model", "--model", *nets, "--resolution", "32"]
    main([*argv, "--layouts", "channels_last", "--no-progress", "--out", str(tmp_path)])
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    throughput = {
        (r["layer"], r["backend"], r["mode"]) for r in rows if r["metric"] == "throughput"
    }
    modes = OPS["model"].modes
    assert {(net, "torch", mode) for net in nets for mode in modes} <= throughput
    # ReLU6 throughout: the native kernels run it (Hardswish, in the other, not yet).
    assert {("timm:mobilenetv2_035", "native", mode) for mode in modes} <= throughput
    out = capsys.readouterr().out
    assert "WRONG" not in out
    assert "51 of its 52 BatchNorms in fused runs" in out


@pytest.mark.parametrize(
    "name,message",
    [("timm:no_such_net", "timm has no model"), ("resnet50", "expected mobilenet_v1")],
)
def test_model_benchmark_rejects_unknown_networks(name, message):
    with pytest.raises(SystemExit, match=message):
        main(["--quick", "--ops", "model", "--model", name, "--no-progress"])


def test_main_restores_the_callers_thread_count():
    """--quick times on one CPU thread; the tests that run after it in this process do not."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with pytest.raises(SystemExit, match="unknown no_such_backend"):
            main(["--quick", "--device", "cpu", "--backends", "no_such_backend"])
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
