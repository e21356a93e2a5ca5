"""`taskcodec bundle add-temporal BUNDLE --out NEW`: fit temporal-coding residual tables (taskcodec.coding.temporal)
on a dwell video (virtual://dwell) through the bundle's own preprocessing and encoder, and add them to a bundle as
the optional file role ``residual_tables`` with a ``temporal`` manifest section (residual tag, the recommended key
interval and SAME threshold, what they were fitted on).

The model id stays the same (it hashes the encoder and the key tables only), so golden vectors and deployed cameras
are unaffected; the residual tag (sha256 over the model tag and the residual tables' digest) names the residual
tables in the HELLO and seeds the check of every COND payload, and the manifest's sha256 covers the file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from taskcodec.bundle import Bundle, BundleError, add_file, load_bundle
from taskcodec.coding import RangeCoder
from taskcodec.coding.temporal import fit_policy_tables, residual_tag

DEFAULTS = {"frames": 1500, "rate": 5.0, "dwell": "1-3", "seed": 1001, "key_interval": 200, "same_l1": 11}


def dwell_symbols(bundle: Bundle, frames: int, rate: float, dwell: str, seed: int, size: int = 112) -> np.ndarray:
    """Symbols [N, D] of a dwell video through the runtime's preprocessing and the bundle's fp32 encoder."""
    from taskcodec.runtime.dwell import DwellCamera
    from taskcodec.runtime.encoder import FrameEncoder
    from taskcodec.runtime.preprocess import Preprocessor

    cam = DwellCamera({"count": str(frames), "seed": str(seed), "rate": str(rate), "dwell": dwell,
                       "size": f"{size}x{size}"})
    pre, enc, spec = Preprocessor(bundle.input), FrameEncoder(bundle), bundle.input
    x = np.concatenate([pre(cam.render(k)[0]).reshape(1, spec.height, spec.width, spec.channels)
                        for k in range(frames)])
    return np.concatenate([enc.symbols(x[i:i + 256]) for i in range(0, len(x), 256)])


def add_temporal(path: str | Path, out: str | Path, frames: int = DEFAULTS["frames"], rate: float = DEFAULTS["rate"],
                 dwell: str = DEFAULTS["dwell"], seed: int = DEFAULTS["seed"],
                 key_interval: int = DEFAULTS["key_interval"], same_l1: int = DEFAULTS["same_l1"]) -> Bundle:
    bundle = load_bundle(path)
    out = Path(out)
    if out.resolve() != bundle.path.resolve():
        if out.exists() and any(out.iterdir()):
            raise BundleError(f"{out} exists and is not empty")
        shutil.copytree(bundle.path, out, dirs_exist_ok=True)
        bundle = load_bundle(out)
    sym = dwell_symbols(bundle, frames, rate, dwell, seed)
    tables = fit_policy_tables(sym, RangeCoder(bundle.tables), bundle.model_tag, key_interval, same_l1)
    target = out / "residual_tables.npz"
    target.write_bytes(tables.to_bytes())
    section = {"file": "residual_tables.npz", "residual_tag": residual_tag(bundle.model_tag, tables).hex(),
               "key_interval": key_interval, "same_l1": same_l1,
               "fitted_on": f"virtual://dwell?count={frames}&rate={rate:g}&dwell={dwell}&seed={seed}&size=112x112 "
                            f"(taskcodec bundle add-temporal)",
               "cdf": "like tables.npz: residual symbols (frame minus reference) over -8..8 plus the escape"}
    new = add_file(bundle, "residual_tables", target, "residual_tables.npz", temporal=section)
    if new.residual_tag.hex() != section["residual_tag"]:
        raise BundleError("residual tag mismatch after writing the bundle")
    return new


def register(app) -> None:
    """Adds `add-temporal` to the `taskcodec bundle` group (entry point taskcodec.commands: bundle_temporal)."""
    import typer

    group = next((g.typer_instance for g in app.registered_groups if g.name == "bundle"), None)
    if group is None:
        group = typer.Typer(help="Model bundle maintenance.", no_args_is_help=True)
        app.add_typer(group, name="bundle")

    @group.command("add-temporal")
    def add_temporal_cmd(
        bundle: Path = typer.Argument(..., help="Bundle folder."),
        out: Path = typer.Option(..., "--out", help="Folder for the new bundle (new or empty; or BUNDLE itself)."),
        frames: int = typer.Option(DEFAULTS["frames"], help="Frames of the dwell video the tables are fitted on."),
        rate: float = typer.Option(DEFAULTS["rate"], help="Scene frame rate of that video."),
        dwell: str = typer.Option(DEFAULTS["dwell"], help="Dwell time range in seconds."),
        seed: int = typer.Option(DEFAULTS["seed"], help="Seed of the training video (keep it apart from test seeds)."),
        key_interval: int = typer.Option(DEFAULTS["key_interval"], help="Recommended key frame interval."),
        same_l1: int = typer.Option(DEFAULTS["same_l1"], help="Recommended SAME threshold (L1 of the symbols)."),
    ) -> None:
        """Fit temporal-coding residual tables on a dwell video and add them to a bundle (model id unchanged)."""
        try:
            new = add_temporal(bundle, out, frames, rate, dwell, seed, key_interval, same_l1)
        except BundleError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        typer.echo(f"bundle {new.path} model id {new.model_id}: residual tables added, residual tag "
                   f"{new.residual_tag.hex()}, key every {key_interval}, SAME if L1 <= {same_l1}")
