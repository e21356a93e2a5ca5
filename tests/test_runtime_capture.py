"""The whole runtime: virtual camera -> tiny bundle encoder -> spool -> uplink, against the fake server and the real
server subprocess; store-and-forward across runtime restarts; Prometheus metrics; the CLI's config file and errors."""

import json
import threading
import time
import urllib.request

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from typer.testing import CliRunner

from taskcodec.runtime.capture import CaptureConfig, CaptureRuntime, run_capture
from taskcodec.runtime.cli import app
from taskcodec.testing.fake_ingest import FakeIngestServer
from taskcodec.runtime.preprocess import Preprocessor
from taskcodec.runtime.sources import open_source
from taskcodec.coding import decompress
from tiny_bundle import make_tiny_bundle

TIMEOUT = 60


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def _cfg(bundle, server_url, spool, **kw):
    base = dict(device="virtual://fashion-mnist?seed=1", bundle=str(bundle.path), server=server_url, camera_id="cam-1",
                token="secret", spool=str(spool), quiet=True, drain_timeout=TIMEOUT, threads=1)
    return CaptureConfig(**{**base, **kw})


def test_capture_delivers_decodable_frames(bundle, tmp_path):
    with FakeIngestServer(bundle.model_tag, tables=bundle.tables) as server:
        report = run_capture(_cfg(bundle, server.url, tmp_path / "spool", frames=30), keep_labels=True)
    assert report.frames == 30 and report.acked == 30 and report.dropped == 0 and report.drained
    assert report.spool_depth == 0 and len(report.labels) == 30 and all(0 <= lab < 10 for lab in report.labels)
    assert report.bits_per_frame > 0 and 0 < report.coding_share < 1 and report.peak_rss_mb > 0
    # the payloads the server got decode to what the encoder makes of the same virtual frames
    frames = [f.image for f, _ in zip(open_source("virtual://fashion-mnist?seed=1"), range(30))]
    sess = ort.InferenceSession(str(bundle.encoder_path()), providers=["CPUExecutionProvider"])
    symbols = sess.run(None, {"frames": Preprocessor(bundle.input).batch(frames)})[0]
    got = {seq: decompress(p, bundle.tables, bundle.model_tag) for (_, _, seq), (_, p) in server.frames.items()}
    assert sorted(got) == list(range(30))
    assert all(np.array_equal(got[i], symbols[i]) for i in range(30))


def test_unsent_frames_survive_a_restart(bundle, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    offline = run_capture(_cfg(bundle, f"http://127.0.0.1:{port}", tmp_path / "spool", frames=12, drain_timeout=0.2))
    assert offline.frames == 12 and offline.acked == 0 and offline.spool_depth == 12 and not offline.drained
    with FakeIngestServer(bundle.model_tag, tables=bundle.tables, port=port) as server:
        online = run_capture(_cfg(bundle, server.url, tmp_path / "spool", frames=5))
    assert online.epoch == offline.epoch  # one epoch per spool; seqs continue across the restart
    assert online.acked == 17 and online.spool_depth == 0
    assert sorted(server.frames) == [("cam-1", offline.epoch, s) for s in range(17)]


def test_metrics_endpoint_and_stop(bundle, tmp_path):
    with FakeIngestServer(bundle.model_tag) as server:
        rt = CaptureRuntime(_cfg(bundle, server.url, tmp_path / "spool", loop=True, metrics_port=0, fps=200))
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", rt.run()))
        t.start()
        try:
            deadline = time.monotonic() + TIMEOUT
            text = ""
            while time.monotonic() < deadline:
                if rt.metrics_port and rt.stats.acked >= 5:
                    with urllib.request.urlopen(f"http://127.0.0.1:{rt.metrics_port}/metrics", timeout=30) as r:
                        text = r.read().decode()
                    break
                time.sleep(0.05)
        finally:
            rt.stop()
            t.join(TIMEOUT)
    assert "taskcodec_runtime_frames_captured_total" in text and "taskcodec_runtime_spool_depth" in text
    assert "taskcodec_runtime_stage_seconds_bucket" in text and 'stage="coding"' in text
    assert not t.is_alive() and result["r"].frames >= 5


def test_cli_config_file_and_flags(bundle, tmp_path):
    with FakeIngestServer(bundle.model_tag) as server:
        config = tmp_path / "camera.yaml"
        config.write_text(yaml.safe_dump({"device": "virtual://fashion-mnist", "bundle": str(bundle.path),
                                          "server": server.url, "camera-id": "cam-yaml", "token": "secret",
                                          "spool": str(tmp_path / "spool"), "frames": 100, "quiet": True}))
        result = CliRunner().invoke(app, ["capture", "--config", str(config), "--frames", "7", "--profile",
                                          "--report", str(tmp_path / "r.json"), "--max-delay", "0"])
        assert result.exit_code == 0, result.output
        assert "7 frames, 7 acked" in result.output and "range coding" in result.output
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["frames"] == 7 and report["camera_id"] == "cam-yaml"
        assert {k[0] for k in server.frames} == {"cam-yaml"}
        # a refused camera is a clear fatal error, exit code 1
        bad = CliRunner().invoke(app, ["capture", "--config", str(config), "--token", "nope", "--frames", "3"])
        assert bad.exit_code == 1 and "unauthorized" in bad.output


@pytest.mark.parametrize("args,message", [
    (["--device", "/dev/video97"], "does not exist"),
    (["--device", "gopher://x"], "unknown source scheme"),
    (["--size", "big"], "WIDTHxHEIGHT"),
    (["--roi", "1,2"], "x,y,w,h"),
    (["--precision", "fp16"], "precision: Input should be 'fp32' or 'int8'"),
    (["--precision", "int8"], "no int8 encoder"),
    (["--fps", "0"], "fps: Input should be greater than 0"),
    (["--spool-max-bytes", "1000"], "spool_max_bytes: Input should be greater than or equal to 262144"),
    (["--token-file", "/nonexistent/token"], "cannot read token file"),
    (["--server", "ftp://x"], "http://HOST:PORT"),
    (["--bundle", "/nonexistent/bundle"], "not a taskcodec bundle"),
    (["--config", "/nonexistent.yaml"], "not found"),
    (["--spool-sync", "sometimes"], "'full' or 'normal'"),
])
def test_cli_errors_are_clear(bundle, tmp_path, args, message):
    base = ["capture", "--device", "virtual://fashion-mnist", "--bundle", str(bundle.path), "--server",
            "http://127.0.0.1:9", "--camera-id", "c", "--spool", str(tmp_path / "s"), "--frames", "1", "-q"]
    result = CliRunner().invoke(app, base + args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output


def test_status_line_renders_rates():
    import io

    from taskcodec.runtime.status import RuntimeStats, StatusLine

    stats = RuntimeStats(camera_id="cam-s")
    line = StatusLine(stats, stream=io.StringIO())
    for _ in range(10):
        stats.frame(25, {"coding": 0.001})
    stats.ack(8)
    stats.set_depth(2)
    text = line.render()
    assert text.startswith("cam-s") and "200.0 bits/frame" in text and "spool 2" in text and "acked 8" in text
    assert "fps" in text and "kbit/s" in text and "[offline]" in text


def test_cli_restores_the_sigterm_handler(bundle, tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    CliRunner().invoke(app, ["capture", "--device", "virtual://fashion-mnist", "--bundle", str(bundle.path),
                             "--server", "http://127.0.0.1:9", "--camera-id", "c", "--spool", str(tmp_path / "s"),
                             "--frames", "2", "--drain-timeout", "0", "-q"])
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("drop", ["--device", "--server", "--camera-id"])
def test_device_server_and_camera_id_are_required(bundle, tmp_path, drop):
    args = {"--device": "virtual://fashion-mnist", "--server": "http://127.0.0.1:9", "--camera-id": "c"}
    args.pop(drop)
    result = CliRunner().invoke(app, ["capture", *[x for kv in args.items() for x in kv], "--bundle",
                                      str(bundle.path), "--spool", str(tmp_path / "s"), "--frames", "1", "-q"])
    assert result.exit_code == 2 and f"missing {drop}" in result.output, result.output


def test_config_file_is_typed_and_frigate_style(bundle, tmp_path, monkeypatch):
    monkeypatch.delenv("TASKCODEC_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    token_file.chmod(0o600)
    with FakeIngestServer(bundle.model_tag) as server:
        config = tmp_path / "cameras.yaml"
        config.write_text(yaml.safe_dump({
            "server": server.url, "bundle": str(bundle.path), "quiet": True, "max_delay": 0,
            "cameras": {"door": {"device": "virtual://fashion-mnist", "spool": str(tmp_path / "s1"),
                                 "token_file": str(token_file), "frames": 3},
                        "yard": {"device": "virtual://fashion-mnist?seed=1", "spool": str(tmp_path / "s2"),
                                 "frames": 4}}}))
        result = CliRunner().invoke(app, ["capture", "--config", str(config), "--camera-id", "door"])
        assert result.exit_code == 0 and "3 frames, 3 acked" in result.output, result.output
        monkeypatch.setenv("TASKCODEC_TOKEN", "secret")  # the other camera's token from the environment
        result = CliRunner().invoke(app, ["capture", "--config", str(config), "--camera-id", "yard"])
        assert result.exit_code == 0 and "4 frames, 4 acked" in result.output, result.output
        assert {k[0] for k in server.frames} == {"door", "yard"}
        result = CliRunner().invoke(app, ["capture", "--config", str(config)])
        assert result.exit_code == 2 and "pick one with --camera-id" in result.output
        result = CliRunner().invoke(app, ["capture", "--config", str(config), "--camera-id", "yard", "--token", "secret"])
        assert result.exit_code == 0 and "visible to every user" in result.output
    for bad, words in (({"fsp": 5}, "fsp: Extra inputs are not permitted"),
                       ({"fps": "fast"}, "fps: Input should be a valid number"),
                       ({"max_batch": 0}, "max_batch: Input should be greater than or equal to 1")):
        config.write_text(yaml.safe_dump({"device": "virtual://fashion-mnist", "server": "http://127.0.0.1:9",
                                          "camera_id": "c", **bad}))
        result = CliRunner().invoke(app, ["capture", "--config", str(config)])
        assert result.exit_code == 2 and words in " ".join(result.output.split()), result.output


def test_nothing_delivered_is_a_non_zero_exit(bundle, tmp_path):
    result = CliRunner().invoke(app, ["capture", "--device", "virtual://fashion-mnist", "--bundle", str(bundle.path),
                                      "--server", "http://127.0.0.1:9", "--camera-id", "c", "--spool",
                                      str(tmp_path / "s"), "--frames", "3", "--drain-timeout", "0.3", "-q"])
    assert result.exit_code == 3 and "nothing was delivered" in result.output, result.output


class _StallingSource:
    """Frames of the virtual camera: ``first`` at once, then nothing until ``go`` is set, then ``rest``."""

    def __new__(cls, first: int, rest: int):
        from taskcodec.runtime.source import Source

        images = [f.image for f, _ in zip(open_source("virtual://fashion-mnist?seed=1"), range(first + rest))]
        go = threading.Event()

        class Stalling(Source):
            def __init__(self):
                super().__init__()
                self.k = 0
                self.go = go

            def _read(self):
                if self.k == first:
                    go.wait(TIMEOUT)
                if self.k >= first + rest:
                    return None
                self.k += 1
                return images[self.k - 1], None

        return Stalling()


def test_a_window_is_spooled_at_its_deadline_when_frames_stop_coming(bundle, tmp_path):
    """Frames are encoded and spooled a window at a time (--batch-window): a source that stalls mid-window does not
    hold its frames back; they are spooled and sent 1.5 windows after the first, while the source is still blocked."""
    source = _StallingSource(3, 2)
    with FakeIngestServer(bundle.model_tag, tables=bundle.tables) as server:
        rt = CaptureRuntime(_cfg(bundle, server.url, tmp_path / "spool", batch_window=0.3, batch_frames=16),
                            source=source)
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", rt.run()))
        t0 = time.monotonic()
        t.start()
        while len(server.frames) < 3 and time.monotonic() - t0 < TIMEOUT:
            time.sleep(0.01)
        waited = time.monotonic() - t0
        assert len(server.frames) == 3 and rt.spool.next_seq == 3 and t.is_alive() and not source.go.is_set()
        assert waited >= 0.25, waited  # held for the window, not sent frame by frame
        source.go.set()
        t.join(TIMEOUT)
    report = result["r"]
    assert report.frames == 5 and report.acked == 5 and report.spool_depth == 0


def test_window_zero_is_frame_by_frame(bundle, tmp_path):
    with FakeIngestServer(bundle.model_tag, tables=bundle.tables) as server:
        rt = CaptureRuntime(_cfg(bundle, server.url, tmp_path / "spool", frames=7, batch_window=0))
        sizes = []
        append_many = rt.spool.append_many
        rt.spool.append_many = lambda items: sizes.append(len(items)) or append_many(items)
        report = rt.run()
    assert report.acked == 7 and sizes == [1] * 7


def test_windows_group_frames(bundle, tmp_path):
    with FakeIngestServer(bundle.model_tag, tables=bundle.tables) as server:
        rt = CaptureRuntime(_cfg(bundle, server.url, tmp_path / "spool", frames=20, batch_window=5, batch_frames=8))
        sizes = []
        append_many = rt.spool.append_many
        rt.spool.append_many = lambda items: sizes.append(len(items)) or append_many(items)
        report = rt.run()
    assert report.acked == 20 and sizes == [8, 8, 4]
