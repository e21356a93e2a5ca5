"""Frame socket end to end: the compiled C example camera (AddressSanitizer + UBSan) sends real Fashion-MNIST frames
and a synthetic colour pattern to FrameSocketSource, which must deliver identical pixels, capture times and labels;
malformed senders lose only their own connection."""

from __future__ import annotations

import socket
import subprocess

import numpy as np
import pytest

from taskcodec.firmware_bridge import build
from taskcodec.runtime.fw_source import FrameSocketSource, SourceError, send_frames
from taskcodec.frame_socket import GRAY8, HEADER_BYTES, FrameHeader, FrameProtocolError, parse_header, synthetic_pattern
from taskcodec.data import load_fashion_mnist

IDLE = 60.0  # generous: a loaded CI machine must never make these tests flaky; max_frames ends them early


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    try:
        build.find_cc()
    except build.BuildError as exc:
        pytest.skip(str(exc))
    sanitize = build.sanitizers_work()
    return str(build.build("fw_camera_example", sanitize=sanitize, werror=True, out_dir=tmp_path_factory.mktemp("fw")))


def _run_example(exe, sock, *args):
    return subprocess.Popen([exe, str(sock), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=build.sanitizer_env())


def _finish(proc) -> str:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def test_c_example_sends_fashion_mnist_frames_intact(example, tmp_path):
    images, labels = load_fashion_mnist("test")
    images, labels = images[:25], labels[:25]
    (tmp_path / "frames.raw").write_bytes(images.tobytes())
    (tmp_path / "labels.raw").write_bytes(labels.astype(np.uint8).tobytes())
    sock = tmp_path / "fw.sock"
    with FrameSocketSource(sock, idle_timeout=IDLE, max_frames=25) as source:
        proc = _run_example(example, sock, "--raw", tmp_path / "frames.raw", "--labels", tmp_path / "labels.raw",
                            "--width", 28, "--height", 28, "--format", "gray8", "--frames", 100,
                            "--ts0", 1_700_000_000_000, "--dt", 40)
        got = list(source)
        assert "sent 25 frames" in _finish(proc)
    assert not sock.exists()  # close() removes the socket file
    assert source.errors == []
    assert [f.index for f in got] == list(range(25))
    assert [f.ts_ms for f in got] == [1_700_000_000_000 + 40 * k for k in range(25)]
    assert [f.label for f in got] == labels.tolist()
    for f, img in zip(got, images):
        assert f.image.shape == (28, 28, 1) and f.image.dtype == np.uint8
        np.testing.assert_array_equal(f.image[..., 0], img)


@pytest.mark.parametrize("fmt", ["rgb24", "bgr24"])
def test_colour_frames_arrive_as_bgr(example, tmp_path, fmt):
    sock = tmp_path / "fw.sock"
    with FrameSocketSource(sock, idle_timeout=IDLE, max_frames=4) as source:
        proc = _run_example(example, sock, "--format", fmt, "--width", 37, "--height", 21, "--frames", 4)
        got = list(source)
        _finish(proc)
    assert len(got) == 4
    for f in got:
        sent = synthetic_pattern(37, 21, 3, f.index)
        np.testing.assert_array_equal(f.image, sent[..., ::-1] if fmt == "rgb24" else sent)
        assert f.label is None and f.ts_ms > 1_600_000_000_000  # wall-clock capture time


def test_malformed_senders_lose_only_their_connection(example, tmp_path):
    sock = tmp_path / "fw.sock"
    good = FrameHeader(8, 4, GRAY8, 123, 7)
    with FrameSocketSource(sock, idle_timeout=IDLE, max_frames=3) as source:
        # Queued in the listen backlog in this order: bad magic, a bad version, a frame cut short, then the C camera.
        for data in (b"JUNK" + good.pack()[4:] + bytes(32),
                     good.pack()[:4] + b"\x09" + good.pack()[5:] + bytes(32),
                     good.pack() + bytes(10)):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(sock))
                s.sendall(data)
        proc = _run_example(example, sock, "--frames", 3, "--width", 16, "--height", 16, "--format", "gray8")
        got = list(source)
        _finish(proc)
    assert len(got) == 3 and [f.index for f in got] == [0, 1, 2]
    np.testing.assert_array_equal(got[2].image, synthetic_pattern(16, 16, 1, 2))
    assert len(source.errors) == 3, source.errors
    assert "bad magic" in source.errors[0]
    assert "version 9" in source.errors[1]
    assert "mid-frame" in source.errors[2]


def test_header_validation():
    good = FrameHeader(640, 480, GRAY8, 5, None).pack()
    assert len(good) == HEADER_BYTES and parse_header(good) == FrameHeader(640, 480, GRAY8, 5, None)
    bad = {
        "pixel format": good[:5] + b"\x07" + good[6:],
        "channels": good[:6] + b"\x03" + good[7:],
        "reserved": good[:7] + b"\x01" + good[8:],
        "outside": good[:8] + b"\x00\x00" + good[10:],
        "payload length": good[:12] + b"\x00\x00\x00\x00" + good[16:],
    }
    for what, raw in bad.items():
        with pytest.raises(FrameProtocolError, match=what):
            parse_header(raw)
    with pytest.raises(FrameProtocolError, match="32 bytes"):
        parse_header(good[:10])


def test_python_sender_and_socket_path_errors(tmp_path):
    sock = tmp_path / "fw.sock"
    with FrameSocketSource(sock, idle_timeout=IDLE, max_frames=2, size=(10, 6)) as source:
        with pytest.raises(SourceError, match="already listening"):
            FrameSocketSource(sock)
        img = np.arange(12 * 20 * 3, dtype=np.uint8).reshape(12, 20, 3)
        assert send_frames(sock, [(img, 1, None), (img, 2, 3)], pixel_format="bgr24") == 2
        got = list(source)
    assert [f.image.shape for f in got] == [(6, 10, 3)] * 2 and got[1].label == 3
    # A stale socket file left by a dead process is replaced; a regular file is never touched.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    FrameSocketSource(tmp_path / "stale.sock").close()
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(SourceError, match="not a socket"):
        FrameSocketSource(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep me"
    with pytest.raises(SourceError, match="does not exist"):
        FrameSocketSource(tmp_path / "missing" / "fw.sock")


def test_idle_timeout_ends_an_empty_stream(tmp_path):
    with FrameSocketSource(tmp_path / "fw.sock", idle_timeout=0.3) as source:
        assert list(source) == []


def test_example_reports_bad_usage_and_no_listener(example, tmp_path):
    proc = subprocess.run([example, str(tmp_path / "nobody.sock"), "--frames", "1"], capture_output=True, text=True,
                          env=build.sanitizer_env(), timeout=60)
    assert proc.returncode == 1 and "cannot connect" in proc.stderr
    proc = subprocess.run([example, str(tmp_path / "x.sock"), "--format", "yuv"], capture_output=True, text=True,
                          env=build.sanitizer_env(), timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
    proc = subprocess.run([example, str(tmp_path / "x.sock"), "--raw", str(tmp_path / "none.raw")],
                          capture_output=True, text=True, env=build.sanitizer_env(), timeout=60)
    assert proc.returncode == 2 and "cannot open" in proc.stderr


def test_cli_build_and_listen(tmp_path):
    import typer
    from typer.testing import CliRunner

    from taskcodec.firmware_bridge.cli import register

    app = typer.Typer()  # only this part's commands: the test does not depend on other parts importing cleanly
    register(app)

    try:
        build.find_cc()
    except build.BuildError as exc:
        pytest.skip(str(exc))
    result = CliRunner().invoke(app, ["firmware", "build", "--out", str(tmp_path / "bin")])
    assert result.exit_code == 0, result.output
    assert any(p.name.startswith("libtaskcodec_fw-") for p in (tmp_path / "bin").iterdir())
    assert any(p.name.startswith("fw_camera_example-") for p in (tmp_path / "bin").iterdir())
    from taskcodec.runtime.cli import app as runtime_app

    result = CliRunner().invoke(runtime_app, ["fw-listen", str(tmp_path / "nofolder" / "s.sock")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_wire_format_document_examples_are_the_reference_bytes():
    from taskcodec.firmware_bridge.doc_examples import DOC, EXAMPLES, parse_doc

    from taskcodec import wire

    documented = parse_doc(DOC.read_text())
    assert set(documented) == set(EXAMPLES)
    for name, make in EXAMPLES.items():
        assert documented[name] == make(), f"docs/wire-format.md example {name!r} is stale"
        if name not in ("stream", "frame_header"):
            wire.decode(documented[name])
