"""The task-agnostic mode: label-free views, the rate warm-up, InfoNCE with or without a projection head, probes on
the full train set, the sweep's bits-against-VC at equal accuracy, a bundle measured by the sweep's protocol, and the
multi-task bench on real Fashion-MNIST and the real default bundle."""

import json

import numpy as np
import pytest
import torch

from taskcodec.bench.tasks import ATTRIBUTES, COARSE, attributes, residual_targets, run_tasks
from taskcodec.bundle import DEFAULT_BUNDLE
from taskcodec.training.augmentations import get_augmentation
from taskcodec.training.models import Compressor, CompressorConfig
from taskcodec.training.sweep import bits_at_accuracy, collect, gains, parse_series, recipe, run_name
from taskcodec.training.trainer import beta_at, train

torch.set_num_threads(1)


def test_views_are_label_free_noisy_and_keep_the_image_roughly():
    aug = get_augmentation("views")
    assert not aug.uses_labels and aug.noise > 0 and aug.erase_prob == 0
    x = torch.rand(8, 1, 28, 28) * 0.2 + 0.4
    a, b = aug(x, torch.Generator().manual_seed(1)), aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)


def test_beta_warmup_ramps_linearly_then_holds():
    cfg = CompressorConfig(beta=0.01, beta_warmup=0.5)
    assert beta_at(cfg, 0, 100) == pytest.approx(0.01 / 50)
    assert beta_at(cfg, 24, 100) == pytest.approx(0.005)
    assert beta_at(cfg, 49, 100) == beta_at(cfg, 99, 100) == pytest.approx(0.01)
    assert beta_at(CompressorConfig(beta=0.01), 0, 100) == 0.01
    with pytest.raises(ValueError):
        CompressorConfig(beta_warmup=1.5)


def test_head_layers_zero_puts_infonce_on_the_bottleneck():
    m = Compressor(CompressorConfig(head_layers=0))
    assert isinstance(m.head, torch.nn.Identity)
    assert isinstance(Compressor(CompressorConfig()).head, torch.nn.Sequential)


def test_more_views_per_image_are_all_positives_of_each_other():
    from taskcodec.training.objectives import bince, supcon_loss

    m = Compressor(CompressorConfig(head_layers=0, views=3))
    x = torch.rand(4, 1, 28, 28)
    seen = {}
    real = supcon_loss

    def spy(features, positives, temperature):
        seen["positives"] = positives
        return real(features, positives, temperature)

    import taskcodec.training.objectives as objectives
    objectives.supcon_loss, saved = spy, objectives.supcon_loss
    try:
        loss, bits = bince(m, [x, x + 0.01, x - 0.01], None, 0.1)
    finally:
        objectives.supcon_loss = saved
    assert bits.shape[0] == 12 and torch.isfinite(loss)
    pos = seen["positives"]  # item i of view a and item j of view b: positives exactly when i == j
    assert pos.shape == (12, 12) and pos.sum().item() == 4 * 9 and pos[1, 5] and pos[1, 9] and not pos[1, 6]
    with pytest.raises(ValueError):
        CompressorConfig(views=1)
    assert recipe({"objective": "bince", "head_layers": 0, "views": 4}) == "no head, 4 views/image"


def test_probes_use_the_full_train_set_when_asked(tmp_path):
    cfg = CompressorConfig(objective="bince", augmentations="views", epochs=1, train_subset=256, test_subset=200,
                           batch_size=64, probe_epochs=1, quantile_steps=100, probe_full_train=True, beta_warmup=0.5)
    m = json.loads((train(cfg, out=tmp_path / "r", progress=False) / "metrics.json").read_text())
    assert m["n_train"] == 256 and m["n_probe_train"] == 60000 and m["beta_warmup"] == 0.5


def test_bits_at_vc_points_gives_a_ratio_where_a_series_outruns_the_vc_curve():
    from taskcodec.training.sweep import bits_at_reference_points

    rows = [{"objective": "vc", "augmentations": "fashion", "beta": b, "coded_bits_mean": bits, "accuracy_mlp": acc}
            for b, bits, acc in ((0.1, 80.0, 0.76), (0.003, 280.0, 0.80))]
    rows += [{"objective": "bince", "augmentations": "placement", "beta": b, "coded_bits_mean": bits,
              "accuracy_mlp": acc} for b, bits, acc in ((0.01, 75.0, 0.78), (0.003, 110.0, 0.82))]
    assert gains(rows)[1]["ratio_to_vc"] is None  # 0.82 is beyond anything VC reaches
    rev = {r["reference_beta"]: r for r in bits_at_reference_points(rows)}
    assert rev[0.003]["series_bits"] == pytest.approx(75 * (110 / 75) ** 0.5)  # VC's best 0.80, halfway on BINCE's
    assert rev[0.003]["ratio_to_vc"] == pytest.approx(75 * (110 / 75) ** 0.5 / 280)
    assert rev[0.1]["series_bits"] is None  # below BINCE's curve: no extrapolation


def test_bits_at_equal_accuracy_interpolates_on_the_vc_curve():
    vc = [{"objective": "vc", "augmentations": "fashion", "beta": b, "coded_bits_mean": bits, "accuracy_mlp": acc}
          for b, bits, acc in ((0.1, 50.0, 0.80), (0.01, 200.0, 0.90), (0.03, 100.0, 0.79))]
    assert bits_at_accuracy(vc, 0.80) == pytest.approx(50.0)
    assert bits_at_accuracy(vc, 0.85) == pytest.approx(100.0)  # geometric midpoint of 50 and 200
    assert bits_at_accuracy(vc, 0.95) is None
    lf = {"objective": "bince", "augmentations": "views", "beta": 0.003, "coded_bits_mean": 40.0, "accuracy_mlp": 0.85}
    (g,) = gains(vc + [lf])
    assert g["ratio_to_vc"] == pytest.approx(0.4) and g["series"] == "BINCE (views)"
    assert parse_series(["bince:views", "vc", "bince"]) == [("bince", "views"), ("vc", "fashion"),
                                                            ("bince", "fashion+label")]
    (spec,) = parse_series(["bince:views head_layers=0 betas=0.001,0.01"])
    assert spec == ("bince", "views", {"head_layers": 0}, [0.001, 0.01])
    assert run_name("bince", 0.01, "views", {"head_layers": 0}) == "bince-views-head_layers0_beta0.01"
    assert run_name("bince", 0.01) == "bince_beta0.01"
    assert run_name("bince", 0.01, "views", {"channels": [64, 128, 256]}) == "bince-views-channels64x128x256_beta0.01"
    assert recipe({"objective": "bince", "channels": [64, 128, 256], "latent_dim": 128}) == \
        "channels 64/128/256, 128-d latent"
    assert recipe({"objective": "bince", "head_layers": 0, "seed": 1}) == "no head, seed 1"


def test_sweep_collects_rows_and_writes_gain_table(tmp_path):
    rows = [{"objective": o, "augmentations": a, "beta": b, "coded_bits_mean": bits, "accuracy_mlp": acc,
             "accuracy_linear": acc, "run": "x"}
            for o, a, b, bits, acc in (("vc", "fashion", 0.1, 60.0, 0.84), ("vc", "fashion", 0.01, 200.0, 0.89),
                                       ("bince", "views", 0.003, 50.0, 0.86), ("bince", "views", 0.001, 120.0, 0.90),
                                       ("bince", "fashion", 0.003, 70.0, 0.85))]
    res = collect([], tmp_path, rows)
    by_series = {(g["series"], g["beta"]): g for g in res["gains_vs_vc"]}
    assert by_series[("BINCE (views)", 0.003)]["ratio_to_vc"] == pytest.approx(50 / (60 * (200 / 60) ** 0.4))
    assert "bits / VC bits" in (tmp_path / "sweep.md").read_text() and (tmp_path / "sweep.png").stat().st_size > 1000
    # the other direction: at VC's 0.84 the BINCE curve (0.86-0.90) has no value, at VC's 0.89 it interpolates
    # log-linearly; a one-point series has no curve to read and is left out
    rev = {(r["reference_beta"], r["series"]): r for r in res["bits_at_vc_points"]}
    assert rev[(0.1, "BINCE (views)")]["series_bits"] is None
    assert rev[(0.01, "BINCE (views)")]["series_bits"] == pytest.approx(50 * (120 / 50) ** 0.75)
    assert rev[(0.01, "BINCE (views)")]["ratio_to_vc"] == pytest.approx(50 * (120 / 50) ** 0.75 / 200)
    assert not any(s == "BINCE (fashion)" for _, s in rev)
    assert "series bits at that acc" in (tmp_path / "sweep.md").read_text()


def test_attributes_measure_what_they_say():
    img = np.zeros((2, 28, 28), np.uint8)
    img[0, 4:10, 2:8] = 200       # small, upper-left, tall == wide
    img[1, 6:22, 6:22] = 100      # large, centred, dimmer
    a = attributes(img)
    size, intensity, balance, aspect, vertical = a.T
    assert size[1] > size[0] and intensity[0] > intensity[1]
    assert balance[0] == pytest.approx(1.0) and abs(balance[1]) < 1e-6
    assert aspect[0] == pytest.approx(0.0) and vertical[0] < vertical[1]
    y = np.array([3, 3])
    r_tr, r_te = residual_targets(a, y, a, y)
    assert np.allclose(r_tr.mean(0), 0, atol=1e-6) and COARSE[8] == 3


def test_bench_tasks_runs_every_representation_on_every_task(tmp_path):
    res = run_tasks([DEFAULT_BUNDLE], tmp_path, jpeg=(1,), webp=(0,), train_limit=2000, epochs=3, log=lambda r: None)
    names = [r["representation"] for r in res["rows"]]
    assert names[:3] == ["raw pixels", "jpeg q=1", "webp q=0"] and names[3].startswith("bundle default")
    for r in res["rows"]:
        assert 0.5 < r["label"] <= 1 and 0.5 < r["coarse"] <= 1
        assert all(0 <= r[a] <= 1 for a in ATTRIBUTES)
    raw, bundle = res["rows"][0], res["rows"][3]
    assert bundle["bytes_per_image"] < 20 < res["rows"][2]["bytes_per_image"]
    assert raw["intensity"] > 0.5  # raw pixels keep the within-class intensity (the probe can learn it)
    assert "10-class acc" in (tmp_path / "tasks.md").read_text()


def test_placement_views_shear_and_the_raw_cnn_line_follows_the_data(tmp_path):
    from taskcodec.training.augmentations import Augmentation
    from taskcodec.training.sweep import RAW_CNN_ACCURACY, raw_cnn_accuracy

    x = torch.zeros(16, 1, 28, 28)
    x[:, :, 4:24, 13:15] = 1.0  # a vertical bar: a horizontal shear tilts it, rows shift by different amounts
    sheared = Augmentation("s", "", shear_deg=20.0)(x, torch.Generator().manual_seed(0))
    tilt = (sheared[:, 0, 6].argmax(1) - sheared[:, 0, 21].argmax(1)).abs()
    assert tilt.max() >= 3 and torch.equal(Augmentation("n", "")(x), x)
    aug = get_augmentation("placement")
    assert not aug.uses_labels and aug.shear_deg > 0 and aug.rotate_deg >= 30
    assert raw_cnn_accuracy(None, None) == RAW_CNN_ACCURACY
    assert raw_cnn_accuracy(None, "fashion-mnist-placed") is None  # no silent plain-data line for other data
    (tmp_path / "classical.json").write_text(json.dumps({"baseline": {"accuracy": 0.8765}}))
    assert raw_cnn_accuracy(tmp_path / "classical.json") == 0.8765
    (tmp_path / "bad.json").write_text(json.dumps({"baseline": None}))
    with pytest.raises(ValueError, match="no fully trained raw-pixel baseline"):
        raw_cnn_accuracy(tmp_path / "bad.json")


def test_conv_depth_adds_stride_one_convs_and_keeps_the_latent_shape():
    shallow, deep = Compressor(CompressorConfig()), Compressor(CompressorConfig(conv_depth=2))
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in c.encoder.modules()) for c in (shallow, deep)]
    assert convs == [3, 6]
    x = torch.randn(2, 1, 28, 28)
    assert deep.latents(x).shape == shallow.latents(x).shape == (2, 64)
    with pytest.raises(ValueError, match="conv_depth"):
        CompressorConfig(conv_depth=0)
