"""The training commands end to end on real data: train a tiny run, evaluate it with the real coder, collect a sweep
table + plot, and refuse bad input with a clear message."""

import json

import pytest
import torch
from typer.testing import CliRunner

from taskcodec.cli import app

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    res = runner.invoke(app, ["train", "--epochs", "1", "--train-limit", "512", "--test-limit", "200",
                              "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "coded bits/img" in res.output
    return out


def test_evaluate_writes_checked_report(tiny_run):
    res = runner.invoke(app, ["evaluate", str(tiny_run), "--test-limit", "300"])
    assert res.exit_code == 0, res.output
    ev = json.loads((tiny_run / "evaluation.json").read_text())
    assert ev["n_test"] == 300 and ev["roundtrip_failures"] == 0
    assert ev["max_payload_excess_bits"] <= 64 and ev["estimate_check_failures"] >= 0
    assert ev["coded_bits_mean"] == pytest.approx(ev["payload_bits_mean"] + 16)
    assert 0.0 <= ev["accuracy_mlp"] <= 1.0 and "accuracy_linear" in ev
    assert "coded_bits_mean" in (tiny_run / "evaluation.md").read_text()


def test_sweep_collects_existing_runs(tiny_run, tmp_path):
    res = runner.invoke(app, ["sweep", "--runs", str(tiny_run), "--out", str(tmp_path / "sw")])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "sw" / "sweep.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["objective"] == "bince"
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    assert "MLP acc" in (tmp_path / "sw" / "sweep.md").read_text()


def test_bad_input_is_refused_clearly(tmp_path):
    res = runner.invoke(app, ["evaluate", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a complete run folder" in res.output
    res = runner.invoke(app, ["train", "--augmentations", "sideways", "--epochs", "0", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "unknown augmentations" in res.output
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "r2")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["sweep", "--betas", "a,b", "--out", str(tmp_path / "s")])
    assert res.exit_code != 0 and "--betas" in res.output
    res = runner.invoke(app, ["sweep", "--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "metrics.json" in res.output
