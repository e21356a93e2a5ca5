"""The main job end to end on the embedded default bundle: virtual 640x480 camera -> runtime -> real server."""

import json

from typer.testing import CliRunner

from taskcodec.cli import app


def test_demo_streams_every_frame_and_classifies_at_the_server(tmp_path):
    out = tmp_path / "demo.json"
    result = CliRunner().invoke(app, ["demo", "--frames", "120", "--quiet", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["frames"] == report["stored"] == report["acked"] == 120
    assert report["accuracy_at_server"] >= 0.8  # the default bundle reaches ~0.9 on Fashion-MNIST items
    assert 16 <= report["payload_bits_per_frame"] <= 128
    assert report["jpeg_ratio"] > 10
    assert "accuracy at the server" in result.output
