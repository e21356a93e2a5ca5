"""int8 encoder of the frozen-backbone bundle: the default scheme quantizes every conv after a short fp32 prefix into
fused QLinearConv (no int8 -> fp32 -> int8 round trips in the graph ORT runs), keeps symbols close to fp32 on real
frames, and the report adds it to the bundle. Small input and few frames keep it fast; no latency assertions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskcodec.training.transfer_datasets import load_dataset, render

SIZE = 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real bundle: ImageNet MobileNetV2 + an (untrained, PCA-initialised) 32-latent head + a probe classifier."""
    from taskcodec.bundle import write_bundle
    from taskcodec.training.backbones import frozen_encoder
    from taskcodec.export.frozen import classifier_onnx
    from taskcodec.training.frozen import FrozenCompressor, SymbolEncoder, embed_frames, probe_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("int8")
        encoder = frozen_encoder("mobilenet_v2")
        train = load_dataset("fashion_mnist_train")
        emb = embed_frames(encoder, render(train.images[:64], SIZE), batch=64)
        model = FrozenCompressor(emb.shape[1], "linear", 32)
        model.set_stats(emb)
        model.linear.weight.data *= 8  # a finer symbol grid than a trained head: a stricter agreement check
        model.eval()
        model.bottleneck.fit_quantiles(steps=10)
        # the legacy exporter (1 s instead of 20 s; same ops) keeps this test fast; test_frozen covers the real one
        torch.onnx.export(SymbolEncoder(encoder, model).eval(), (torch.zeros(2, SIZE, SIZE, 3, dtype=torch.uint8),),
                          str(tmp / "enc.onnx"), dynamo=False, opset_version=17, input_names=["frames"],
                          output_names=["symbols"], dynamic_axes={"frames": {0: "N"}, "symbols": {0: "N"}})
        symbols = model.symbols(emb)
        classifier_onnx(tmp / "cls.onnx", probe_pipeline().fit(symbols.astype(np.float32), train.labels[:64]), 32)
        model.bottleneck.tables().save(tmp / "tables.npz")
        return write_bundle(tmp / "bundle", files={"encoder": tmp / "enc.onnx", "tables": tmp / "tables.npz",
                                                   "classifier": tmp / "cls.onnx"},
                            manifest={"name": "frozen-int8-test", "latent_dim": 32, "classes": [str(c) for c in range(10)],
                                      "input": {"height": SIZE, "width": SIZE, "channels": 3, "color_order": "rgb"}})
    finally:
        torch.set_num_threads(threads)


def test_scheme_validation():
    from taskcodec.calibration.frozen_int8 import CALIB_FRAMES, DEFAULT_SCHEME
    from taskcodec.calibration.measure import FROZEN_BUDGET_POINTS
    from taskcodec.calibration.schemes import Scheme

    assert DEFAULT_SCHEME.fp32_first_convs >= 1 and not DEFAULT_SCHEME.fp32_depthwise and "Clip" in DEFAULT_SCHEME.ops
    with pytest.raises(ValueError, match="calibration method"):
        Scheme(method="kl")
    with pytest.raises(ValueError, match="format"):
        Scheme(fmt="qlinear")
    # `frozen export` uses DEFAULT_SCHEME; `frozen int8` with no flags must try the very same scheme, frames and gate
    from taskcodec.calibration import frozen_cli as c

    defaults = [o.default for o in (c.METHOD, c.PERCENTILE, c.PCT_LINEAR, c.FP32_FIRST, c.KEEP_FP32, c.FP32_DW,
                                    c.QUANT_CLIP, c.QUANT_ADD, c.FMT, c.ACTS, c.REDUCE, c.LATCORR)]
    assert c._scheme(*defaults) == DEFAULT_SCHEME
    assert c.CALIB.default == CALIB_FRAMES and c.BUDGET.default == FROZEN_BUDGET_POINTS


def test_histogram_range_rules():
    from taskcodec.calibration.quantize import _mse_range, _percentile_range

    x = np.concatenate([np.linspace(-1, 1, 9998), [-50.0, 50.0]])  # two outliers in 10000 values
    t = np.abs(x).max()
    hist, edges = np.histogram(x, 2048, range=(-t, t))
    lo, hi = _percentile_range(hist.astype(float), edges, x.min(), x.max(), 99.9)
    assert -1.1 < lo < -0.9 and 0.9 < hi < 1.1
    assert _percentile_range(hist.astype(float), edges, x.min(), x.max(), 100.0) == (-50.0, 50.0)
    lo, hi = _mse_range(hist.astype(float), edges, x.min(), x.max())
    assert lo <= -1 and hi >= 1 and hi - lo < 100  # the outliers are clipped, the bulk is kept
    relu6 = np.clip(np.random.default_rng(0).normal(0.5, 1, 20000), 0, 6)
    hist, edges = np.histogram(relu6, 2048, range=(-6, 6))
    lo, hi = _percentile_range(hist.astype(float), edges, relu6.min(), relu6.max(), 99.99)
    assert lo == 0.0 and 3 < hi <= 6


def test_default_scheme_fuses_every_int8_conv_and_keeps_symbols_close(bundle, tmp_path):
    from taskcodec.providers import ort_session as session, run_batched as run
    from taskcodec.calibration.frozen_int8 import DEFAULT_SCHEME
    from taskcodec.calibration.quantize import fp32_nodes, graph_check, quantize
    from taskcodec.calibration.schemes import Scheme

    import onnx

    nodes = onnx.load(str(bundle.encoder_path())).graph.node
    n_conv = sum(n.op_type == "Conv" for n in nodes)
    kept = fp32_nodes(bundle.encoder_path())
    assert "ReduceMean" in {n.op_type for n in nodes if n.name in kept}
    first = DEFAULT_SCHEME.fp32_first_convs
    assert sum(n.op_type == "Conv" for n in nodes if n.name in kept) == first  # one fp32 prefix
    calib = render(load_dataset("fashion_mnist_train").images[64:128], SIZE)
    path = quantize(bundle.encoder_path(), tmp_path / "int8.onnx", calib)
    check = graph_check(path)
    assert check["ops"]["com.microsoft:QLinearConv"] == n_conv - first
    assert check["ops"].get("com.microsoft:QLinearAdd", 0) == 10
    assert check["dq_to_q_round_trips"] == 0
    assert "Clip" not in check["ops"] or check["ops"]["Clip"] <= 1
    frames = render(load_dataset("fashion_mnist").images[:32], SIZE)
    s32, s8 = run(session(bundle.encoder_path()), frames), run(session(path), frames)
    assert s8.dtype == np.int32 and s8.shape == s32.shape == (32, 32)
    assert np.corrcoef(s8.ravel(), s32.ravel())[0, 1] > 0.9
    np.testing.assert_array_equal(run(session(path), frames), s8)  # deterministic
    # a ReLU6 left in fp32 costs a DQ -> Clip -> Q round trip between two int8 convs: graph_check sees each one
    clip = quantize(bundle.encoder_path(), tmp_path / "clip.onnx", calib,
                    Scheme(ops=("Conv", "Add"), fp32_first_convs=1))
    assert graph_check(clip)["dq_to_q_round_trips"] == 33  # 35 ReLU6: the first conv's is fp32, the last ends it
    assert DEFAULT_SCHEME.to_dict()["ops"] == ["Conv", "Clip", "Add"]


def test_the_accuracy_gate_refuses_a_broken_quantizer_and_adds_the_default_one(bundle):
    """The gate the runtime relies on, with the frozen bundles' own budget (1 point): a broken quantizer (activation
    ranges cut to the 1st percentile of |x|) loses far more than 1 % of the frames and is refused, the bundle left
    without an int8 encoder; the default scheme keeps the classifier within the budget on 256 test frames (here it
    gains 2 frames: a 4-frame margin for CPUs whose int8 kernels round differently) and is added."""
    from taskcodec.bundle import load_bundle
    from taskcodec.calibration.frozen_int8 import DEFAULT_SCHEME, int8_report
    from taskcodec.calibration.measure import FROZEN_BUDGET_POINTS
    from taskcodec.calibration.schemes import Scheme

    broken = int8_report(bundle, Scheme(percentile=1.0, percentile_linear=1.0), calib=32, n_eval=64,
                         latency_rounds=0, progress=lambda _: None)
    assert broken["frames_allowed"] == 0 and broken["frames_lost"] > 5 and not broken["accuracy_passed"]
    assert not load_bundle(bundle.path).has("encoder_int8")
    result = int8_report(bundle, DEFAULT_SCHEME, calib=32, n_eval=256, latency_rounds=0, progress=lambda _: None)
    assert result["targets"]["accuracy_drop_points_max"] == FROZEN_BUDGET_POINTS and result["frames_allowed"] == 2
    assert result["frames_lost"] <= result["frames_allowed"]
    assert result["int8"]["correct"] == result["fp32"]["correct"] - result["frames_lost"]
    assert 0 <= result["symbol_agreement"] <= result["symbols_within_1"] <= 1
    assert result["accuracy_passed"] and not result["passed"]  # no latency measured: the target is not claimed
    assert result["int8"]["bytes_per_image"] > 0 and result["graph"]["dq_to_q_round_trips"] == 0
    reloaded = load_bundle(bundle.path)
    assert reloaded.manifest["files"]["encoder_int8"] == "encoder_int8.onnx"
    assert reloaded.manifest["int8"]["scheme"]["method"] == "percentile"
    import onnx

    ops = [n.op_type for n in onnx.load(str(reloaded.file("encoder_int8"))).graph.node]
    assert ops[-4:] == ["Mul", "Add", "Round", "Cast"]  # the per-latent correction, in fp32 before Round


def test_bundle_transfer_runs_both_encoders_on_unseen_data(bundle, tmp_path, monkeypatch):
    """`taskcodec frozen bench-bundle`: the deployed encoders on an unseen dataset, with real bytes and the probe."""
    import json

    from taskcodec.bench.transfer import bundle_transfer, write_bundle_outputs
    from taskcodec.bundle import load_bundle
    from taskcodec.calibration.frozen_int8 import int8_report
    from taskcodec.training.transfer_datasets import DATASETS, TransferSet

    if not load_bundle(bundle.path).has("encoder_int8"):
        int8_report(bundle, calib=32, n_eval=64, latency_rounds=0, progress=lambda _: None)
    assert load_bundle(bundle.path).has("encoder_int8")
    mnist = load_dataset("mnist")
    idx = np.random.default_rng(0).permutation(len(mnist))[:100]
    monkeypatch.setitem(DATASETS, "mnist_100", lambda: TransferSet("mnist_100", mnist.images[idx], mnist.labels[idx],
                                                                     mnist.classes))
    report = bundle_transfer(bundle.path, ["mnist_100"], progress=lambda _: None)
    d = report["datasets"]["mnist_100"]
    assert d["n"] == 100 and set(d) >= {"fp32", "int8", "symbol_agreement"}
    for precision in ("fp32", "int8"):
        assert d[precision]["bytes"] >= 2  # at least the stream's check
        assert d[precision]["accuracy_on_symbols"] > 0.15  # chance 0.1 (10 classes); ~0.3 here with an untrained head
    assert 0 < d["symbol_agreement"] <= 1
    write_bundle_outputs(report, tmp_path, command="test")
    assert json.loads((tmp_path / "transfer_bundle.json").read_text())["model_id"] == bundle.model_id
    assert "| mnist_100 | 100 |" in (tmp_path / "transfer_bundle.md").read_text()


def test_frozen_bundle_runs_through_the_product_path(bundle, tmp_path):
    """The generic compressor is a bundle like any other: virtual camera -> runtime (RGB input spec) -> real server,
    which decodes the streams with the bundle's tables and classifies them with its classifier."""
    import json

    from typer.testing import CliRunner

    from taskcodec.cli import app

    out = tmp_path / "demo.json"
    result = CliRunner().invoke(app, ["demo", "--bundle", str(bundle.path), "--frames", "30", "--quiet",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["model_id"] == bundle.model_id
    assert report["frames"] == report["stored"] == report["acked"] == 30
    assert report["payload_bits_per_frame"] >= 16  # at least the stream's check


def test_golden_vectors_of_an_rgb_frozen_bundle_verify_and_catch_a_changed_table(bundle, tmp_path):
    """What `frozen export` adds: golden frames -> symbols -> bytes that verify on this machine, and fail loudly when
    the shipped tables no longer match the committed bytes."""
    import shutil

    from taskcodec.export.golden import GOLDEN_FILE, make_golden, verify_golden
    from taskcodec.bundle import BundleError, add_file, load_bundle
    from taskcodec.coding import EntropyTables

    copy = tmp_path / "bundle"
    shutil.copytree(bundle.path, copy)
    frames = render(load_dataset("fashion_mnist").images[:6], SIZE)
    b = load_bundle(copy)
    b = add_file(b, "golden", make_golden(b, frames, tmp_path / GOLDEN_FILE))
    assert verify_golden(load_bundle(copy)).ok
    tables = EntropyTables.load(copy / "tables.npz")
    pmf = tables.pmf.copy()
    for d, n in enumerate(tables.length):  # same support and escape, flat probabilities: the bytes change
        pmf[d, :n] = 1.0 / n
    EntropyTables(tables.lower, tables.length, pmf).save(tmp_path / "flat.npz")
    shutil.copyfile(tmp_path / "flat.npz", copy / "tables.npz")
    with pytest.raises(BundleError, match="sha256"):  # an edited file is refused on load
        load_bundle(copy)
    shutil.copyfile(bundle.path / "tables.npz", copy / "tables.npz")
    add_file(load_bundle(copy), "tables", tmp_path / "flat.npz", "tables.npz")  # a re-signed but wrong table
    report = verify_golden(load_bundle(copy))
    assert not report.ok and report.bytes_equal < report.frames
