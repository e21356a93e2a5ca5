"""`taskcodec bench server` (the server's CPU per frame, in-process) and `taskcodec bench runtime` (a real
`runtime capture` process against the real server), through the real typer app."""

import json

from typer.testing import CliRunner

from taskcodec.bench.cli import bench_app
from tiny_bundle import make_tiny_bundle

runner = CliRunner()


def test_serve_bench_writes_json_markdown_and_png(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    out = runner.invoke(bench_app, ["server", "--bundle", str(bundle.path), "--out", str(tmp_path / "r"),
                              "--frames", "40", "--seconds", "0.5", "--cameras", "4"])
    assert out.exit_code == 0, out.output
    import json

    result = json.loads((tmp_path / "r" / "serve_bench_d8.json").read_text())
    assert [s["messages_per_microbatch"] for s in result["stages"]] == [1, 10, 50, 250]
    assert all(s["total_cpu_us"] > 0 for s in result["stages"])
    assert {(p["cameras"], p["microbatch"]) for p in result["pipeline"]} == {(4, False), (4, True)}
    assert all(p["frames"] > 0 for p in result["pipeline"])
    assert (tmp_path / "r" / "serve_bench_d8.md").read_text().startswith("# Ingest server CPU per frame")
    assert (tmp_path / "r" / "serve_bench_d8.png").stat().st_size > 1000
    bad = runner.invoke(bench_app, ["server", "--bundle", str(bundle.path), "--cameras", "a,b"])
    assert bad.exit_code == 2 and "comma-separated" in bad.output


def test_runtime_bench_writes_json_and_markdown_against_the_real_server(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b")
    result = runner.invoke(bench_app, ["runtime", "--bundle", str(bundle.path), "--frames", "20", "--out",
                                      str(tmp_path / "prof")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "prof" / "runtime_profile.json").read_text())
    run = data["runs"][0]
    assert run["precision"] == "fp32" and run["frames"] == 20 and run["acked"] == 20 and run["peak_rss_mb"] > 0
    assert 0 < run["coding_share"] < 1 and "CPU" in data["machine"]
    assert "| fp32 | full | 20 |" in (tmp_path / "prof" / "runtime_profile.md").read_text()
