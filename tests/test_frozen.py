"""The frozen-backbone generic compressor: real ImageNet weights, a real photo, a short real training run on real
cached features, and the exported bundle round trip (ONNX symbols == torch symbols; compress/decompress)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taskcodec.training.backbones import (BACKBONES, IMAGENET_CAT_CLASSES, BackboneError, BackboneSpec, MobileNetV2,
                                frozen_encoder, get_spec, load_backbone, load_state_dict, register_backbone)
from taskcodec.training.transfer_datasets import DATASETS, DatasetError, load_dataset, render

SIZE = 96  # small input keeps the tests fast; the architecture is size-agnostic


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoder():
    return frozen_encoder("mobilenet_v2")


def test_imagenet_weights_load_with_every_key_matching():
    path = get_spec("mobilenet_v2").default_weights()
    state = load_state_dict(path)
    model = MobileNetV2()
    assert set(state) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert state[k].shape == v.shape, k
    assert model.load_state_dict(state, strict=True).missing_keys == []
    frozen = load_backbone("mobilenet_v2", path)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(frozen.classifier[1].weight, state["classifier.1.weight"])


def test_bad_weights_are_refused_clearly(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("mobilenet_v2", tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="not a loadable"):
        load_backbone("mobilenet_v2", junk)
    partial = tmp_path / "partial.pth"
    state = load_state_dict(get_spec("mobilenet_v2").default_weights())
    state.pop("classifier.1.bias")
    torch.save(state, partial)
    with pytest.raises(BackboneError, match="strict"):
        load_backbone("mobilenet_v2", partial)
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("resnet-9000")


def test_a_user_can_register_another_backbone(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def embed(self, x):
            return self.conv(x).mean(dim=(2, 3))

    torch.save(Tiny().state_dict(), tmp_path / "tiny.pth")
    register_backbone(BackboneSpec("tiny-test", Tiny, 8, lambda: tmp_path / "tiny.pth"))
    try:
        emb = frozen_encoder("tiny-test")(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
        assert emb.shape == (2, 8)
    finally:
        BACKBONES.pop("tiny-test")


def test_real_cat_photo_is_a_cat(encoder):
    import cv2
    from skimage.data import chelsea

    frame = cv2.resize(chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    with torch.inference_mode():
        logits = encoder.backbone.classifier(encoder(torch.from_numpy(frame[None])))
    assert int(logits.argmax()) in IMAGENET_CAT_CLASSES


def test_transfer_datasets_registry_and_rendering():
    assert {"fashion_mnist_train", "fashion_mnist", "mnist", "lfw"} <= set(DATASETS)
    lfw = load_dataset("lfw")
    assert lfw.images.shape == (200, 25, 25) and lfw.images.dtype == np.uint8
    assert np.bincount(lfw.labels).tolist() == [100, 100]
    mnist = load_dataset("mnist")
    assert len(mnist) == 5000 and sorted(set(mnist.labels.tolist())) == list(range(10))
    frames = render(lfw.images[:3], 64)
    assert frames.shape == (3, 64, 64, 3) and (frames[..., 0] == frames[..., 2]).all()
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet-22k")


@pytest.fixture(scope="module")
def trained(encoder):
    """A short real training run on real (cached in memory) backbone features of Fashion-MNIST train images."""
    from taskcodec.training.frozen import FrozenConfig, embed_frames, train_compressor

    images = load_dataset("fashion_mnist_train").images[:96]
    emb = embed_frames(encoder, render(images, SIZE), batch=48)
    config = FrozenConfig(size=SIZE, transform="diag", latent_dim=0, beta=0.05, steps=150, batch=48)
    model, info = train_compressor(emb, config, progress=False)
    return model, config, info, emb


def test_short_training_run_lowers_the_rate(trained):
    model, config, info, emb = trained
    hist = info["history"]
    assert hist[-1]["bits"] < hist[0]["bits"]
    assert all(np.isfinite([h["bits"], h["mse"]]).all() for h in hist)
    tables = model.bottleneck.tables()
    assert tables.dim == 1280
    symbols = model.symbols(emb)
    assert symbols.dtype == np.int32 and symbols.shape == (96, 1280)


def test_linear_head_trains_on_few_samples(trained):
    from taskcodec.training.frozen import FrozenConfig, train_compressor

    emb = trained[3][:64]
    model, info = train_compressor(emb, FrozenConfig(size=SIZE, latent_dim=128, steps=30, batch=32), progress=False)
    assert model.symbols(emb).shape == (64, 128) and model.bottleneck.tables().dim == 128


def test_views_training_reconstructs_the_plain_embedding(tmp_path, monkeypatch):
    """Augmented views are real renderings (cached, reproducible), and the head trained on them is scored against
    the plain embedding: a model trained on views must beat an untrained one at predicting it from a view."""
    from taskcodec.training.augmentations import augment_images, get_augmentation
    from taskcodec.training.frozen import FeatureStore, FrozenCompressor, FrozenConfig, train_compressor
    from taskcodec.training.transfer_datasets import DATASETS, TransferSet

    full = load_dataset("fashion_mnist_train")
    monkeypatch.setitem(DATASETS, "fmnist_tiny", lambda: TransferSet("fmnist_tiny", full.images[:64],
                                                                     full.labels[:64], full.classes))
    store = FeatureStore(SIZE, cache_dir=tmp_path)
    views = store.views("fmnist_tiny", 2)
    assert views.shape == (64, 3, 1280)
    np.testing.assert_array_equal(views[:, 0], store.get("fmnist_tiny")["emb"])
    assert np.abs(views[:, 1] - views[:, 0]).mean() > 1e-3 and np.abs(views[:, 2] - views[:, 1]).mean() > 1e-3
    np.testing.assert_array_equal(store.views("fmnist_tiny", 2), views)  # cached and reproducible
    aug = get_augmentation("generic")
    np.testing.assert_array_equal(augment_images(full.images[:4], aug, 7), augment_images(full.images[:4], aug, 7))

    config = FrozenConfig(size=SIZE, latent_dim=64, beta=1e-4, steps=120, batch=32, views=2)
    model, info = train_compressor(views, config, progress=False)
    untrained = FrozenCompressor(1280, "linear", 64)
    untrained.set_stats(views[:, 0])
    x, target = torch.from_numpy(views[:, 1]), torch.from_numpy(views[:, 0])
    with torch.no_grad():
        assert model(x, target=target)[2].mean() < untrained.eval()(x, target=target)[2].mean()
    with pytest.raises(ValueError, match="unknown augmentations"):
        store.views("fmnist_tiny", 1, "no-such-set")


def test_bundle_round_trip(trained, tmp_path, monkeypatch):
    """`frozen export` through the one export path: ONNX symbols == torch symbols on 64 real frames (the parity
    report, also in the manifest), the ONNX classifier agrees with the probe, golden vectors verify, and each image's
    symbols survive compress/decompress."""
    import json
    from dataclasses import replace

    from taskcodec.bundle import load_bundle
    from taskcodec.coding import RangeCoder, StreamError, compress, decompress
    from taskcodec.export.frozen import export_bundle
    from taskcodec.export.golden import verify_golden
    from taskcodec.export.writer import REPORT_FILE
    from taskcodec.providers import ort_session, run_batched
    from taskcodec.training.frozen import save_run
    from taskcodec.training.transfer_datasets import TransferSet

    full = load_dataset("fashion_mnist_train")
    monkeypatch.setitem(DATASETS, "fmnist_tiny", lambda: TransferSet("fmnist_tiny", full.images[:96],
                                                                     full.labels[:96], full.classes))
    model, config, info, emb = trained
    run = save_run(model, replace(config, train_set="fmnist_tiny"), tmp_path / "run", info)
    bundle = export_bundle(run, tmp_path / "bundle", cache_dir=tmp_path / "cache", progress=lambda _: None)
    report = json.loads((bundle.path / REPORT_FILE).read_text())
    assert report["test_images"] == 64 and report["symbol_agreement"] == 1.0 and report["max_symbol_difference"] == 0
    assert report["accuracy_onnx"] == report["accuracy_torch"] > 0.3  # chance: 0.1
    assert bundle.manifest["frozen_compressor"]["onnx_torch_symbol_agreement"] == 1.0
    bundle = load_bundle(bundle.path)
    assert verify_golden(bundle).ok and bundle.latent_dim == 1280 and bundle.input.channels == 3
    frames = render(load_dataset("fashion_mnist").images[:8], SIZE)
    onnx_symbols = run_batched(ort_session(bundle.encoder_path()), frames)
    assert onnx_symbols.dtype == np.int32 and onnx_symbols.shape == (8, 1280)
    coder = RangeCoder(bundle.tables)
    for s in onnx_symbols:
        data = compress(s, coder, bundle.model_tag)
        np.testing.assert_array_equal(decompress(data, coder, bundle.model_tag), s)
    with pytest.raises(StreamError):
        decompress(data, coder, b"\x00" * 8)  # another model's tag


def test_cli_classify_and_clear_errors(tmp_path):
    import cv2
    from skimage.data import chelsea
    from typer.testing import CliRunner

    from taskcodec.cli import app

    photo = tmp_path / "chelsea.png"
    cv2.imwrite(str(photo), cv2.cvtColor(chelsea(), cv2.COLOR_RGB2BGR))
    runner = CliRunner()
    result = runner.invoke(app, ["frozen", "classify", str(photo), "--top", "1"])
    assert result.exit_code == 0, result.output
    assert int(result.output.split()[2]) in IMAGENET_CAT_CLASSES
    result = runner.invoke(app, ["frozen", "classify", str(tmp_path / "missing.png")])
    assert result.exit_code == 2 and "cannot read an image" in result.output
    result = runner.invoke(app, ["frozen", "classify", str(photo), "--weights", str(tmp_path / "nope.pth")])
    assert result.exit_code == 2 and "weights file not found" in result.output
    result = runner.invoke(app, ["frozen", "export", str(tmp_path / "no-run"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "not a frozen-compressor run" in result.output
