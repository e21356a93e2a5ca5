"""Natural images that ship with the installed packages, as an operator's image folder: each class is one scene
(scikit-image's astronaut, chelsea, coffee and rocket; scikit-learn's china and flower) seen through random camera
crops (35-85 % of the shorter side, anywhere in the photo), left-right flips, small rotations, brightness/contrast
jitter and sensor noise, saved as JPEG files in torchvision's ImageFolder layout (ROOT/<class>/<n>.jpg). The task is
"which scene is the camera looking at"; other photos (Hubble deep field, a histology slide, a retina, gray textures
and scenes) are out of its domain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

IN_SCENES = ("astronaut", "chelsea", "coffee", "rocket", "china", "flower")
OUT_SCENES = ("hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins", "moon", "page", "text",
              "brick", "grass", "gravel", "clock", "cell")


def photo(name: str) -> np.ndarray:
    """One photo as uint8 RGB [H, W, 3] (gray photos are repeated into three channels)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.clip(np.rint(img * 255.0 if img.max() <= 1.0 else img), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def camera_crops(img: np.ndarray, n: int, size: int, rng: np.random.Generator, scale=(0.35, 0.85)) -> np.ndarray:
    """n augmented square crops of an RGB photo -> uint8 [n, size, size, 3]."""
    import cv2

    h, w = img.shape[:2]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        side = int(rng.uniform(*scale) * min(h, w))
        cy, cx = rng.uniform(side / 2, h - side / 2), rng.uniform(side / 2, w - side / 2)
        m = cv2.getRotationMatrix2D((cx, cy), float(rng.uniform(-12, 12)), size / side)
        m[:, 2] += (size / 2 - cx, size / 2 - cy)
        crop = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REFLECT)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        x = crop.astype(np.float32) * rng.uniform(0.75, 1.25) + rng.uniform(-20, 20)
        x = (x - x.mean()) * rng.uniform(0.8, 1.2) + x.mean() + rng.normal(0, rng.uniform(0, 6), x.shape)
        out[i] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


def make_image_folder(root: str | Path, per_class: int = 60, size: int = 96, scenes=IN_SCENES, seed: int = 0,
                      quality: int = 92) -> Path:
    """Write ROOT/<scene>/<n>.jpg: ``per_class`` camera crops of each scene; returns ROOT."""
    import cv2

    root = Path(root)
    rng = np.random.default_rng(seed)
    for name in scenes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, crop in enumerate(camera_crops(photo(name), per_class, size, rng)):
            if not cv2.imwrite(str(folder / f"{i:04d}.jpg"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, quality]):
                raise OSError(f"cannot write {folder / f'{i:04d}.jpg'}")
    return root


def out_of_domain_crops(n_per_scene: int = 20, size: int = 96, scenes=OUT_SCENES, seed: int = 1,
                        gray: bool = False) -> np.ndarray:
    """Camera crops of photos outside the example's scenes: uint8 RGB [N, size, size, 3] (or gray [N, size, size])."""
    import cv2

    rng = np.random.default_rng(seed)
    crops = np.concatenate([camera_crops(photo(s), n_per_scene, size, rng) for s in scenes])
    return np.stack([cv2.cvtColor(c, cv2.COLOR_RGB2GRAY) for c in crops]) if gray else crops


PHOTO_LOADERS: dict[str, Callable[[], np.ndarray]] = {s: (lambda s=s: photo(s)) for s in IN_SCENES + OUT_SCENES}


# -- the end-to-end example: train -> export -> calibrate -> runtime -> server, against JPEG / WebP -----------------
def _codec_rgb(image: np.ndarray, codec: str, quality: int) -> bytes:
    """Same encoder settings as bench/classical.py (JPEG optimize, WebP method 6), on RGB frames."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    if codec == "jpeg":
        Image.fromarray(image, mode="RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    else:
        Image.fromarray(image, mode="RGB").save(buf, format="WEBP", quality=quality, method=6)
    return buf.getvalue()


def _decode_rgb(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _pixel_classifier_accuracy(train: np.ndarray, ytr: np.ndarray, test: np.ndarray, yte: np.ndarray,
                               epochs: int = 12, seed: int = 0) -> float:
    """A small CNN (4 stride-2 conv stages 32-64-128-128 with BatchNorm, global average pool, linear) trained on the
    decoded train frames with flips and shifts, accuracy on the decoded test frames: the same network and recipe for
    raw pixels and every codec quality, so an accuracy drop is the codec's."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    layers, c = [], 3
    for cout in (32, 64, 128, 128):
        layers += [nn.Conv2d(c, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        c = cout
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, int(ytr.max()) + 1))

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div(255.0).sub(0.5).div(0.25)

    x, y = tensor(train), torch.from_numpy(np.asarray(ytr, np.int64))
    batch = 64
    steps = max(1, len(x) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            xb = x[idx]
            if torch.rand(1, generator=gen).item() < 0.5:
                xb = xb.flip(3)
            dy, dx = torch.randint(-4, 5, (2,), generator=gen).tolist()
            xb = torch.roll(xb, (dy, dx), (2, 3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(tensor(test[i:i + 256])).argmax(1) for i in range(0, len(test), 256)]).numpy()
    return float((pred == np.asarray(yte)).mean())


QUALITIES = {"jpeg": (1, 5, 10, 20, 40, 75), "webp": (0, 1, 5, 20, 75)}


def classical_rows(train, ytr, test, yte, qualities=QUALITIES, log=print) -> list[dict]:
    rows = [{"codec": "raw", "quality": None, "bytes_per_image": float(test[0].size),
             "accuracy": _pixel_classifier_accuracy(train, ytr, test, yte)}]
    for codec in ("jpeg", "webp"):
        for q in qualities[codec]:
            dec_tr = np.stack([_decode_rgb(_codec_rgb(x, codec, q)) for x in train])
            files = [_codec_rgb(x, codec, q) for x in test]
            dec_te = np.stack([_decode_rgb(f) for f in files])
            row = {"codec": codec, "quality": q, "bytes_per_image": float(np.mean([len(f) for f in files])),
                   "accuracy": _pixel_classifier_accuracy(dec_tr, ytr, dec_te, yte)}
            rows.append(row)
            log(f"{codec} q{q}: {row['bytes_per_image']:.1f} B, accuracy {row['accuracy']:.4f}")
    return rows


def run_example(work: Path, out: Path, per_class: int = 100, size: int = 64, epochs: int = 15, beta: float = 3e-4,
                latent_dim: int = 32, log=print) -> dict:
    import shutil
    import subprocess
    import sys
    import time

    from taskcodec import testing
    from taskcodec.bench.classical import bytes_at_accuracy
    from sklearn.metrics import roc_auc_score
    from taskcodec.bundle import load_bundle
    from taskcodec.data import load_frames, _items, parse_data
    from taskcodec.export.build import export_run
    from taskcodec.export.golden import run_encoder
    from taskcodec.export.ood import add_ood, threshold_for
    from taskcodec.report import machine_info, utc_now
    from taskcodec.runtime.capture import CaptureConfig, run_capture
    from taskcodec.server.ood import OutOfDomain
    from taskcodec.training.defaults import default_config
    from taskcodec.training.trainer import train

    t_start = time.perf_counter()
    work = Path(work)
    if work.exists():
        shutil.rmtree(work)
    data = make_image_folder(work / "scenes", per_class=per_class, size=128)
    spec = parse_data(f"folder:{data}")
    cfg = default_config(image_shape=(3, size, size), epochs=epochs, beta=beta, latent_dim=latent_dim, batch_size=64)
    run = train(cfg, data_dir=spec, out=work / "run", progress=False)
    metrics = __import__("json").loads((run / "metrics.json").read_text())
    log(f"trained: MLP accuracy {metrics['accuracy_mlp']:.4f}, {metrics['coded_bits_mean']:.1f} coded bits")
    bundle = add_ood(export_run(run, work / "bundle", spec), run, str(spec), 0.01)
    calibrated = work / "bundle-int8"
    cmd = [shutil.which("taskcodec") or "taskcodec", "calibrate", str(bundle.path), "--out", str(calibrated),
           "--budget", "1.0"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:])
    streamed = load_bundle(calibrated) if proc.returncode == 0 else bundle
    precision = "int8" if proc.returncode == 0 else "fp32"

    # stream the test split's image files through the runtime to a real server
    items, classes = _items(spec, "test")
    frames_dir = work / "camera"
    frames_dir.mkdir()
    for i, (path, _) in enumerate(items):
        shutil.copy(path, frames_dir / f"{i:05d}{path.suffix}")
    labels = np.array([c for _, c in items])
    with testing.ServerProcess(streamed.path, work / "server.db") as srv:
        token = srv.add_camera("cam-natural").decode()
        report = run_capture(CaptureConfig(device=str(frames_dir), bundle=str(streamed.path), server=srv.url,
                                           camera_id="cam-natural", token=token, spool=str(work / "spool"),
                                           frames=len(items), precision=precision, quiet=True, drain_timeout=120,
                                           threads=1))
        stored = sorted(srv.get_json(f"/v1/cameras/cam-natural/frames?limit={len(items) + 10}")["frames"],
                        key=lambda f: f["seq"])
    pred = np.array([f["prediction"] for f in stored])
    server_acc = float((pred == labels[:len(pred)]).mean())
    unknown = float((pred == -1).mean())
    bytes_per_frame = float(np.mean([f["payload_bytes"] for f in stored]))
    log(f"server: {len(stored)} stored, accuracy {server_acc:.4f}, {bytes_per_frame:.2f} B/frame, unknown {unknown:.3f}")

    train_set = load_frames(spec, "train", size, size, 3)
    test_set = load_frames(spec, "test", size, size, 3)
    rows = classical_rows(train_set.frames, train_set.labels, test_set.frames, test_set.labels, log=log)
    target = server_acc
    eq = {}
    for codec in ("jpeg", "webp"):
        b, upper = bytes_at_accuracy(rows, codec, target)
        eq[codec] = {"bytes": b, "is_upper_bound": upper, "ratio": (b / bytes_per_frame) if b else None}

    # out-of-domain photos against this bundle's flag
    ood = OutOfDomain.from_bundle(streamed)
    foreign = np.stack([to_rgb_input(x, size) for x in out_of_domain_crops(20, 128, seed=3)])
    s_cal = ood.scores(run_encoder(streamed.encoder_path(), test_set.frames[0::2]))
    s_in = ood.scores(run_encoder(streamed.encoder_path(), test_set.frames[1::2]))
    s_out = ood.scores(run_encoder(streamed.encoder_path(), foreign))
    thr5 = threshold_for(s_cal, 0.05)  # what `taskcodec export --ood-false-alarm 0.05` would store
    result = {
        "command": "taskcodec bench natural " + " ".join(sys.argv[3:]), "measured_at": utc_now(),
        "machine": machine_info(), "classes": list(classes), "input": f"{size}x{size}x3",
        "n_train": int(len(train_set)), "n_test": int(len(test_set)), "epochs": epochs, "beta": beta,
        "latent_dim": latent_dim, "model_id": streamed.model_id, "precision_streamed": precision,
        "train_accuracy_probe": metrics["accuracy_mlp"], "coded_bits_mean_eval": metrics["coded_bits_mean"],
        "server": {"stored": len(stored), "acked": report.acked, "accuracy": server_acc, "unknown_rate": unknown,
                   "payload_bytes_per_frame": bytes_per_frame, "bits_per_frame_runtime": report.bits_per_frame},
        "classical": rows, "equal_accuracy": eq,
        "ood": {"threshold": ood.threshold, "false_alarm_rate_test_odd": float((s_in > ood.threshold).mean()),
                "detection_rate_foreign_photos": float((s_out > ood.threshold).mean()),
                "auroc": float(roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s_out))], np.r_[s_in, s_out])), "n_foreign": int(len(foreign)), "n_calibration": int(len(s_cal)),
                "at_5_percent": {"threshold": thr5, "false_alarm_rate_test_odd": float((s_in > thr5).mean()),
                                 "detection_rate_foreign_photos": float((s_out > thr5).mean())}},
        "wall_s": time.perf_counter() - t_start,
    }
    write_example(result, out)
    return result


def to_rgb_input(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def write_example(result: dict, out: Path) -> None:
    from taskcodec.report import machine_line, markdown_table, write_json, write_text

    s, eq = result["server"], result["equal_accuracy"]

    def ratio(c):
        e = eq[c]
        if e["bytes"] is None:
            return "not reached"
        return f"{e['bytes']:.1f} B ({'<= ' if e['is_upper_bound'] else ''}{e['ratio']:.1f}x)"

    lines = [
        "# Natural-image example (scenes of scikit-image / scikit-learn photos)", "",
        f"`{result['command']}` at {result['measured_at']}: {len(result['classes'])} classes "
        f"({', '.join(result['classes'])}), camera crops with augmentations written as an image folder; "
        f"{result['n_train']} train / {result['n_test']} test images at {result['input']}; BINCE, beta "
        f"{result['beta']:g}, D={result['latent_dim']}, {result['epochs']} epochs; export (+ out-of-domain threshold) "
        f"-> calibrate (int8, new model id {result['model_id']}) -> the test images as files through `runtime` "
        f"({result['precision_streamed']}) -> real server.", "",
        "| what | value |", "|---|---|",
        f"| frames stored / acked | {s['stored']} / {s['acked']} |",
        f"| accuracy at the server | {s['accuracy']:.4f} |",
        f"| payload bytes per frame (stored, incl. 2-byte check) | {s['payload_bytes_per_frame']:.2f} |",
        f"| frames flagged unknown (in-domain test) | {s['unknown_rate']:.3f} |",
        f"| JPEG bytes at equal accuracy (÷ taskcodec) | {ratio('jpeg')} |",
        f"| WebP bytes at equal accuracy (÷ taskcodec) | {ratio('webp')} |",
        f"| out-of-domain flag, shipped 1 % target: false alarms (odd test half) / foreign photo crops detected | "
        f"{result['ood']['false_alarm_rate_test_odd']:.3f} / {result['ood']['detection_rate_foreign_photos']:.3f} of "
        f"{result['ood']['n_foreign']} |",
        f"| same at a 5 % target (`--ood-false-alarm 0.05`) | "
        f"{result['ood']['at_5_percent']['false_alarm_rate_test_odd']:.3f} / "
        f"{result['ood']['at_5_percent']['detection_rate_foreign_photos']:.3f} |",
        f"| AUROC (in-domain odd test half vs foreign crops) | {result['ood']['auroc']:.3f} |", "",
        f"With {result['ood']['n_calibration']} held-out in-domain frames a 1 % target can only set the threshold at "
        "the largest in-domain score, so it flags little; an operator with more held-out frames gets a tighter "
        "threshold.", "",
        "JPEG/WebP: every test frame at the bundle's input size encoded as a complete file (PIL, JPEG optimize, WebP "
        "method 6); accuracy of a small CNN (4 stride-2 conv stages, 12 epochs, flips and shifts) trained on the decoded "
        "train frames at the same quality and tested on the decoded test frames; bytes interpolated in log-bytes at the server's accuracy "
        "(bench/classical.py bytes_at_accuracy).", "",
        markdown_table(result["classical"], [("codec", "codec"), ("quality", "quality"),
                                             ("bytes_per_image", "bytes/frame"), ("accuracy", "accuracy")],
                       {"bytes_per_image": ".1f", "accuracy": ".4f"}),
        machine_line(result["machine"]), ""]
    write_json(Path(out) / "natural.json", result)
    write_text(Path(out) / "natural.md", "\n".join(lines))


def natural_cmd(
    work: Path = __import__("typer").Option(Path("runs/natural"), "--work", help="folder for the data, run, bundles"),
    out: Path = __import__("typer").Option(Path("bench/results"), "--out", help="folder for natural.{json,md}"),
    per_class: int = __import__("typer").Option(100, "--per-class", min=10),
    epochs: int = __import__("typer").Option(15, "--epochs", min=1),
) -> None:
    """The end-to-end natural-image example: image folder -> train -> export -> calibrate -> runtime -> server, with
    JPEG/WebP bytes at equal accuracy."""
    import torch
    import typer

    torch.set_num_threads(1)
    r = run_example(work, out, per_class=per_class, epochs=epochs, log=typer.echo)
    typer.echo(f"accuracy {r['server']['accuracy']:.4f} at {r['server']['payload_bytes_per_frame']:.2f} B/frame; "
               f"wrote {out / 'natural.json'}, {out / 'natural.md'}")
