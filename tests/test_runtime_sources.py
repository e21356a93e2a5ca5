"""Frame sources (video file, image folder, virtual camera, device errors) and preprocessing to the encoder input."""

import os

import cv2
import numpy as np
import pytest

from taskcodec.runtime.preprocess import PreprocessError, Preprocessor, parse_roi
from taskcodec.runtime.sources import (CapturedFrame, SourceError, VirtualFashionMNIST, gstreamer_available, open_source,
                             parse_size)
from taskcodec.bundle import InputSpec
from taskcodec.data import load_fashion_mnist


def _write_video(path, frames=12, size=(64, 48)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    assert writer.isOpened()
    for i in range(frames):
        img = np.full((size[1], size[0], 3), 20 * i % 256, np.uint8)
        cv2.putText(img, str(i), (5, 40), cv2.FONT_HERSHEY_SIMPLEX, 1, (255, 255, 255), 2)
        writer.write(img)
    writer.release()


def test_video_file_frames_and_loop(tmp_path):
    path = tmp_path / "clip.avi"
    _write_video(path)
    with open_source(str(path)) as src:
        frames = list(src)
    assert len(frames) == 12
    assert all(isinstance(f, CapturedFrame) and f.image.shape == (48, 64, 3) and f.label is None for f in frames)
    assert [f.index for f in frames] == list(range(12))
    # brightness ramps with the frame number: the frames come in order
    means = [f.image.mean() for f in frames]
    assert means[5] > means[1]
    with open_source(f"file://{path}", size=(32, 24), loop=True) as src:
        it = iter(src)
        looped = [next(it) for _ in range(30)]
    assert looped[-1].index == 29 and looped[0].image.shape == (24, 32, 3)


def test_image_folder_sorted_skips_unreadable(tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), np.full((20, 30), 50 * i, np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    frames = list(open_source(str(tmp_path)))
    assert [int(f.image.mean()) for f in frames] == [0, 50, 100]
    assert frames[0].image.shape == (20, 30)
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source(str(tmp_path / "missing_dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        open_source(str(tmp_path / "empty"))


def test_virtual_camera_is_deterministic_and_labelled():
    images, labels = load_fashion_mnist("test")
    a = list(open_source("virtual://fashion-mnist?seed=3&count=5"))
    b = list(open_source("virtual://fashion-mnist?seed=3&count=5"))
    assert len(a) == 5 and all(np.array_equal(x.image, y.image) and x.label == y.label for x, y in zip(a, b))
    # native size: the frame is the dataset image itself, with its label
    for f in a:
        matches = np.where((images == f.image).all(axis=(1, 2)))[0]
        assert any(labels[m] == f.label for m in matches)
    cam = open_source("virtual://fashion-mnist?seed=3&count=2&size=640x480")
    frames = list(cam)
    assert frames[0].image.shape == (480, 640, 3) and frames[0].label == a[0].label
    x, y, w, h = cam.item_roi
    assert (x, y, w, h) == (80, 0, 480, 480)
    assert frames[0].image[:, :x].max() == 0 and frames[0].image[y:y + h, x:x + w].max() > 0
    # the ROI crop brings back the dataset item
    pre = Preprocessor(InputSpec(28, 28, 1, "gray"), roi=cam.item_roi)
    back = pre(frames[0].image)[0, :, :, 0].astype(int)
    assert np.abs(back - a[0].image.astype(int)).mean() < 12
    assert isinstance(cam, VirtualFashionMNIST)
    with pytest.raises(SourceError, match="does not know"):
        open_source("virtual://fashion-mnist?colour=red")
    with pytest.raises(SourceError, match="unknown virtual camera"):
        open_source("virtual://mnist")


def test_device_errors_are_clear(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source("/dev/video97")
    with pytest.raises(SourceError, match="does not exist"):
        open_source("v4l2:///dev/video97")
    fake = tmp_path / "video0"
    fake.write_bytes(b"")
    with pytest.raises(SourceError, match="not a V4L2 device"):
        open_source(f"v4l2://{fake}")
    if not gstreamer_available():
        with pytest.raises(SourceError, match="GStreamer"):
            open_source("csi://0")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceError, match="cannot open network stream"):
        open_source(f"rtsp://127.0.0.1:{port}/cam")
    with pytest.raises(SourceError, match="unknown source scheme"):
        open_source("gopher://camera")
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "missing.mp4"))
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_size("640by480")
    assert parse_size("640x480") == (640, 480)


def test_fps_cap_never_delivers_faster(tmp_path):
    import time

    src = open_source("virtual://fashion-mnist?count=6", fps=20)
    t0 = time.monotonic()
    assert len(list(src)) == 6
    assert time.monotonic() - t0 >= 5 / 20 * 0.9  # 5 periods between 6 frames: a lower bound only


def test_preprocess_roi_colour_resize():
    bgr = np.zeros((480, 640, 3), np.uint8)
    bgr[100:200, 300:400] = (255, 0, 0)  # a blue square
    rgb = Preprocessor(InputSpec(32, 32, 3, "rgb"), roi=(300, 100, 100, 100))(bgr)
    assert rgb.shape == (1, 32, 32, 3) and rgb.dtype == np.uint8
    assert (rgb[0, :, :, 2] == 255).all() and (rgb[0, :, :, 0] == 0).all()  # blue ends up last in RGB
    gray = Preprocessor(InputSpec(28, 28, 1, "gray"))(bgr)
    assert gray.shape == (1, 28, 28, 1)
    from_gray = Preprocessor(InputSpec(16, 16, 3, "bgr"))(np.full((50, 50), 7, np.uint8))
    assert from_gray.shape == (1, 16, 16, 3) and (from_gray == 7).all()
    bgra = np.dstack([bgr, np.full((480, 640), 255, np.uint8)])
    assert Preprocessor(InputSpec(28, 28, 1, "gray"))(bgra).shape == (1, 28, 28, 1)
    with pytest.raises(PreprocessError, match="outside"):
        Preprocessor(InputSpec(28, 28, 1, "gray"), roi=(600, 0, 100, 100))(bgr)
    with pytest.raises(PreprocessError, match="8-bit"):
        Preprocessor(InputSpec(28, 28, 1, "gray"))(bgr.astype(np.float32))
    with pytest.raises(ValueError, match="x,y,w,h"):
        parse_roi("1,2,3")
    assert parse_roi("80,0,480,480") == (80, 0, 480, 480)
    assert Preprocessor(InputSpec(28, 28, 1, "gray")).batch([bgr, bgr]).shape == (2, 28, 28, 1)


def test_fw_scheme_opens_the_firmware_frame_socket(tmp_path):
    frame_socket = pytest.importorskip("taskcodec.runtime.fw_source")
    src = open_source(f"fw://{tmp_path / 'cam.sock'}", size=(28, 28))
    try:
        assert isinstance(src, frame_socket.FrameSocketSource) and (tmp_path / "cam.sock").exists()
    finally:
        src.close()
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"fw://{tmp_path / 'missing' / 'cam.sock'}")
