"""``mmfree-fpga sweep``: points as Dask tasks, the cache, the table and the plot, bad arguments.

The sweep test runs real measurements on a LocalCluster of two worker processes: cycle
simulations (Amaranth's simulator, a few seconds each on a small random model) and the
performance model, and then the same sweep again, which must find every measurement cached
and run nothing.
"""

from __future__ import annotations

import csv
import json

import pytest

from mmfree_fpga.cli import main
from mmfree_fpga.config import PERF_MODEL, ModelConfig
from mmfree_fpga.reference.checkpoint import save_checkpoint
from mmfree_fpga.sweep import (SweepSpec, measurement_fields, measurement_key, pareto_front, plan_points,
                               plot_items, resolve_model, run_measurement, run_sweep)

from conftest import random_model

# d and I multiples of 8 and 16 lanes; small enough for Amaranth's simulator to take seconds
SMALL = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(random_model(SMALL, seed=5), tmp_path_factory.mktemp("sweep") / "ckpt")


def _argv(checkpoint, tmp_path):
    return ["sweep", "--checkpoint", str(checkpoint), "--kinds", "sim,model", "--lanes", "8,16",
            "--packings", "base3,2bit", "--clocks-mhz", "50,60", "--simulator", "amaranth",
            "--prompt-ids", "1", "--steps", "1", "--workers", "2", "--cache", str(tmp_path / "cache"),
            "--out", str(tmp_path / "out"), "--json-out", str(tmp_path / "result.json")]


def test_sweep_on_a_local_cluster_then_a_rerun_runs_nothing(checkpoint, tmp_path, capsys):
    argv = _argv(checkpoint, tmp_path)
    assert main(argv) == 0
    r = json.loads((tmp_path / "result.json").read_text())
    # 2 kinds x 2 lanes x 2 packings x 2 clocks; a measurement serves both clocks
    assert (r["points"], r["measurements"], r["run"], r["cached"], r["failed"]) == (16, 8, 8, 0, 0)
    assert r["cluster"] == "a LocalCluster of 2 worker processes"
    for row in r["rows"]:
        assert row["error"] is None
        assert row["tokens_per_s"] == pytest.approx(row["clock_mhz"] * 1e6 / row["cycles_per_token"])
        model = PERF_MODEL.cycles_per_token(SMALL, row["lanes"])
        if row["kind"] == "sim":
            assert row["matches_integer_model"] is True         # the engine's tokens = the integer model's
            assert row["cycles_source"] == "sim"
            assert abs(row["cycles_per_token"] / model - 1) < 0.05
        else:
            assert row["cycles_per_token"] == model
    out = tmp_path / "out"
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 16 and {t["kind"] for t in table} == {"sim", "model"}
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "sweep.md").read_text()
    assert "| kind | board | lanes |" in md and "Pareto front" in md
    # the front: lanes (no build points) against tokens/s, at the faster clock
    assert r["pareto"] and all(label.endswith("60MHz") for label in r["pareto"])

    entries = sorted((tmp_path / "cache" / "sweep").glob("*.json"))
    assert len(entries) == 8
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    capsys.readouterr()
    assert main(argv) == 0
    again = json.loads((tmp_path / "result.json").read_text())
    assert (again["measurements"], again["cached"], again["run"], again["cluster"]) == (8, 8, 0, None)
    assert "8 cached: nothing to run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in entries} == stamps
    strip = [{k: v for k, v in row.items() if k != "cached"} for row in r["rows"]]
    assert [{k: v for k, v in row.items() if k != "cached"} for row in again["rows"]] == strip
    assert all(row["cached"] for row in again["rows"])


def test_sweep_on_an_existing_scheduler(tmp_path):
    """--scheduler: the measurements go to a cluster already running (here an in-process one)."""
    from distributed import LocalCluster
    spec = SweepSpec(kinds=("model",), lanes=(16, 32, 64), clocks_mhz=(100.0,))
    model = resolve_model("370M", spec.packings)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        result = run_sweep(spec, model, cache_dir=tmp_path, scheduler=cluster.scheduler_address)
    assert result.cluster == f"the Dask scheduler at {cluster.scheduler_address}" and result.run == 3
    assert [row["cycles_per_token"] for row in result.rows] == \
        [PERF_MODEL.cycles_per_token(model.cfg, n) for n in (16, 32, 64)]


def test_a_failed_point_is_a_row_with_its_error(checkpoint):
    """A build the board's PLL cannot clock fails before any tool runs: an error, no exception."""
    spec = SweepSpec(kinds=("build",), lanes=(16,), clocks_mhz=(2000.0,))
    model = resolve_model(str(checkpoint), spec.packings)
    (point,) = plan_points(spec, model)
    _sha, files = model.images["base3"]
    result = run_measurement(measurement_fields(point, spec, model), files)
    assert "2000" in result["error"] and result["seconds"] >= 0


@pytest.mark.parametrize("args,message", [
    (["--boards", "nosuch"], "unknown board 'nosuch'"),
    (["--lanes", "12"], "lanes 12 is not one of 8, 16, 32, 64"),
    (["--boards", "icebreaker", "--lanes", "16"], "runs the tiny engine, one lane"),
    (["--lanes", "64"], "must be multiples of lanes=64"),          # d = 32
    (["--kinds", "build", "--model", "370M"], "build points need a checkpoint"),
    (["--kinds", "sim,nosuch"], "unknown point kind 'nosuch'"),
    (["--packings", "base5"], "unknown packing 'base5'"),
    (["--clocks-mhz", "50,0"], "positive numbers"),
    (["--model", "9B"], "not a published geometry"),
])
def test_bad_arguments_one_line_exit_2_no_files(checkpoint, tmp_path, capsys, args, message):
    argv = ["sweep", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *args]
    if "--model" not in args:
        argv += ["--checkpoint", str(checkpoint)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_keys_and_the_pareto_front():
    model = resolve_model("370M", ("base3",))
    spec = SweepSpec(kinds=("sim", "model"), boards=("ulx3s-85f",), lanes=(16,), clocks_mhz=(50.0, 60.0))
    points = plan_points(spec, model)
    keys = [measurement_key(measurement_fields(p, spec, model)) for p in points]
    # a sim or model measurement serves every clock
    assert len(points) == 4 and len(set(keys)) == 2
    other = measurement_fields(points[0], SweepSpec(kinds=("sim",), steps=3), model)
    assert measurement_key(other) not in keys
    rows = [{"kind": "build", "error": None, "luts": luts, "tokens_per_s": tps, "timing_met": met, "label": name}
            for name, luts, tps, met in [("a", 100, 10.0, True), ("b", 200, 5.0, True), ("c", 300, 30.0, True),
                                         ("d", 150, 20.0, True), ("e", 50, 99.0, False)]]
    items, axis = plot_items(rows)
    assert axis == "LUTs (build)" and len(items) == 4            # timing not met: left out
    assert [p["label"] for _, _, p in pareto_front(items)] == ["a", "d", "c"]
