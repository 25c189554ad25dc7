"""`python -m bench --quick` runs every op and mode of the suite on the CPU and writes its files."""

import csv

from bench.__main__ import main


def test_quick_run_writes_checked_results(tmp_path, capsys):
    main(["--quick", "--no-progress", "--out", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "depthwise_bandwidth.png",
        "depthwise_time.png",
        "results.csv",
        "summary.md",
    ]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    native = [r for r in rows if r["backend"] == "native" and r["metric"] == "time"]
    assert {r["mode"] for r in native} == {"forward", "backward"}
    assert {r["layout"] for r in native} == {"channels_last", "nchw"}
    assert all(float(r["median"]) > 0 for r in native)
    assert "WRONG" not in capsys.readouterr().out
