"""`runtime capture` (also `taskcodec capture`): run a camera against an ingest server.

Settings come from ``--config FILE.yaml`` and are overridden by flags given on the command line. The file holds
either one camera's settings (keys are the flag names, dashes or underscores) or, Frigate-style, shared settings
plus a ``cameras:`` mapping of camera id -> that camera's settings (``--camera-id`` picks one; a file with one camera
needs no flag). Every value is typed (capture.CaptureConfig): an unknown or mistyped key is refused with its name.
``--device``, ``--server`` and ``--camera-id`` are required (flag or file). The token comes from ``--token-file``
(or ``token_file:`` in the file) or the environment variable TASKCODEC_TOKEN; ``--token`` still works but is
visible to every user in /proc and warns.

Exit codes: 0 done; 1 stopped by a fatal server refusal; 2 bad input; 3 frames were there to deliver and none was
acknowledged (server unreachable, frames stay spooled); 70 the uplink crashed on a bug (traceback in the log).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import typer

TOKEN_ENV = "TASKCODEC_TOKEN"
EXIT_FATAL, EXIT_BAD_INPUT, EXIT_NOTHING_DELIVERED, EXIT_CRASH = 1, 2, 3, 70
FLAG_HELP = {
    "device": "Source (required): /dev/videoN, v4l2:///dev/videoN, csi://N, rtsp://..., file://PATH or PATH (video "
              "or image folder), virtual://fashion-mnist?size=640x480&seed=0, fw://SOCKET.",
}


def _load_config(path: Path | None, camera_id: str | None) -> dict:
    if path is None:
        return {}
    import yaml

    if not path.is_file():
        raise typer.BadParameter(f"config file {path} not found", param_hint="--config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise typer.BadParameter(f"{path} is not valid YAML: {exc}", param_hint="--config") from None
    if not isinstance(data, dict):
        raise typer.BadParameter(f"{path} must hold a mapping of setting names to values", param_hint="--config")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    cameras = data.pop("cameras", None)
    if cameras is None:
        return data
    if not isinstance(cameras, dict) or not cameras:
        raise typer.BadParameter(f"'cameras' in {path} must map camera ids to their settings", param_hint="--config")
    if camera_id is None:
        if len(cameras) != 1:
            raise typer.BadParameter(f"{path} describes cameras {', '.join(map(str, cameras))}: pick one with "
                                     f"--camera-id", param_hint="--camera-id")
        camera_id = str(next(iter(cameras)))
    if camera_id not in {str(k) for k in cameras}:
        raise typer.BadParameter(f"camera {camera_id!r} is not in {path} (cameras: {', '.join(map(str, cameras))})",
                                 param_hint="--camera-id")
    section = {str(k): v for k, v in cameras.items()}[camera_id] or {}
    if not isinstance(section, dict):
        raise typer.BadParameter(f"cameras.{camera_id} in {path} must be a mapping", param_hint="--config")
    return {**data, "camera_id": camera_id, **{str(k).replace("-", "_"): v for k, v in section.items()}}


def build_config(flags: dict, config_file: Path | None):
    """Merge config-file values and flags (flags win) into a CaptureConfig, validating every value."""
    from pydantic import ValidationError

    from taskcodec.runtime.capture import CaptureConfig

    merged = _load_config(config_file, flags.get("camera_id"))
    merged.update({k: v for k, v in flags.items() if v is not None})
    missing = [n for n in ("device", "server", "camera_id") if not merged.get(n)]
    if missing:
        raise typer.BadParameter(
            f"missing {', '.join('--' + n.replace('_', '-') for n in missing)} (a flag or a key of --config): the "
            f"runtime has no default camera, server or camera id")
    try:
        return CaptureConfig(**merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '?'}: {e['msg']}"
                             + ("" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})")
                             for e in exc.errors())
        where = f" in {config_file}" if config_file else ""
        raise typer.BadParameter(f"invalid setting(s){where}: {problems}") from None


def capture(
    device: Optional[str] = typer.Option(None, "--device", "-d", help=FLAG_HELP["device"]),
    bundle: Optional[str] = typer.Option(None, "--bundle", "-b", help="Model bundle folder (default: the embedded one)."),
    server: Optional[str] = typer.Option(None, "--server", "-s", help="Ingest server (required), http://HOST:PORT or ws://HOST:PORT."),
    camera_id: Optional[str] = typer.Option(None, "--camera-id", help="This camera's id (required; 1..255 bytes)."),
    token_file: Optional[str] = typer.Option(None, "--token-file", help="File holding the camera token (chmod 600). Or set $TASKCODEC_TOKEN."),
    token: Optional[str] = typer.Option(None, "--token", help="Camera token on the command line: visible in /proc to every user; prefer --token-file or $TASKCODEC_TOKEN.", hidden=False),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 or int8 encoder."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (default 1: the encoder is small, and a thread pool spins after every run)."),
    providers: Optional[str] = typer.Option(None, "--providers", help="Execution providers, e.g. cuda,cpu (default: best available)."),
    fps: Optional[float] = typer.Option(None, "--fps", help="Frame rate cap."),
    size: Optional[str] = typer.Option(None, "--size", help="Capture size WxH, e.g. 640x480."),
    roi: Optional[str] = typer.Option(None, "--roi", help="Region of interest x,y,w,h in capture pixels."),
    loop: Optional[bool] = typer.Option(None, "--loop/--no-loop", help="Restart files, folders and virtual cameras at the end."),
    batch_window: Optional[float] = typer.Option(None, "--batch-window", help="Seconds a captured frame may wait to be encoded and spooled together with the next ones (default 0.3: ~9 frames at 30 fps, one encoder run and one spool fsync for all; about half the CPU per frame, up to 0.3 s more latency; a kill -9 or power loss also loses the frames held, never a spooled one). 0: frame by frame."),
    batch_frames: Optional[int] = typer.Option(None, "--batch-frames", help="At most this many frames per --batch-window (default 16)."),
    max_delay: Optional[float] = typer.Option(None, "--max-delay", help="Extra seconds the uplink waits to fill a network batch (default 0: send what the capture loop spooled at once; with --batch-window 0 set e.g. 0.2 to save uplink CPU)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Frames per batch."),
    spool: Optional[str] = typer.Option(None, "--spool", help="Spool folder (durable store-and-forward)."),
    spool_max_frames: Optional[int] = typer.Option(None, "--spool-max-frames", help="Spool bound in frames; when full the oldest frames are dropped."),
    spool_max_bytes: Optional[int] = typer.Option(None, "--spool-max-bytes", help="Spool bound in bytes on disk (database + WAL; default 256 MiB); when full, or when the disk is full, the oldest frames are dropped."),
    spool_sync: Optional[str] = typer.Option(None, "--spool-sync", help="full (default: every spool write, one per --batch-window, is fsync'd before the frames can be sent: a power loss loses only frames not yet spooled, never a spooled, sent or acknowledged one) or normal (no fsync: survives kill -9, but a power loss may also lose the last spooled frames)."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="Serve Prometheus metrics on this port."),
    frames: Optional[int] = typer.Option(None, "--frames", "-n", help="Stop after this many frames."),
    drain_timeout: Optional[float] = typer.Option(None, "--drain-timeout", help="At the end, seconds to wait for acks."),
    quiet: Optional[bool] = typer.Option(None, "--quiet/--no-quiet", "-q", help="No live status line."),
    temporal: Optional[bool] = typer.Option(None, "--temporal/--no-temporal", help="Temporal coding on the uplink (KEY / COND / SAME frames per connection; needs a bundle with residual tables and a v3 server)."),
    key_interval: Optional[int] = typer.Option(None, "--key-interval", help="Temporal: a key frame at least every K frames (default: the bundle's)."),
    same_l1: Optional[int] = typer.Option(None, "--same-l1", help="Temporal: send SAME when the symbols are within this L1 distance of the reference (default: the bundle's)."),
    budget_bps: Optional[float] = typer.Option(None, "--budget-bps", help="Payload bit budget per second (implies --temporal): a token bucket picks SAME / COND / KEY per frame so every window stays within 5 %."),
    budget_window: Optional[float] = typer.Option(None, "--budget-window", help="Seconds of the window the budget holds over (default 60; the bucket holds 5 % of it)."),
    trusted_keys: Optional[list[str]] = typer.Option(None, "--trusted-key", help="Operator Ed25519 public key (PEM; taskcodec models keygen) whose signature a bundle rolled out over the air must carry; repeatable. Turns over-the-air rollout on."),
    rollout_poll: Optional[float] = typer.Option(None, "--rollout-poll", help="Seconds between checks of this camera's model assignment (default 30)."),
    profile: bool = typer.Option(False, "--profile", help="Print the per-stage time breakdown at the end."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the run's report (JSON) to this file."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of settings, one camera or a 'cameras:' mapping (flags override it)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log uplink and spool events."),
) -> None:
    """Capture frames, encode them with the bundle's encoder, spool them durably and stream them to the server.

    Frames are encoded and spooled a window at a time (--batch-window, default 0.3 s) and the spool fsyncs each window
    (--spool-sync full): a kill -9 or power loss loses at most the frames of the window not yet spooled, never a
    spooled, sent or acknowledged frame."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    flags = {k: v for k, v in locals().items() if k not in ("config", "profile", "report", "verbose")}
    if token is not None:
        typer.secho(f"warning: --token is visible to every user of this machine (ps, /proc/PID/cmdline); use "
                    f"--token-file or ${TOKEN_ENV}", err=True, fg="yellow")
    elif token_file is None and os.environ.get(TOKEN_ENV):
        flags["token"] = os.environ[TOKEN_ENV]
    try:
        cfg = build_config(flags, config)
    except typer.BadParameter as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    from taskcodec.runtime.capture import CaptureRuntime, UplinkCrashed, UplinkFatal
    from taskcodec.runtime.encoder import EncoderError
    from taskcodec.runtime.preprocess import PreprocessError
    from taskcodec.runtime.sources import SourceError
    from taskcodec.runtime.spool import SpoolError
    from taskcodec.bundle import BundleError
    from taskcodec.data import DataError
    from taskcodec.providers import ProviderError

    bad_input = (BundleError, SourceError, SpoolError, EncoderError, PreprocessError, ProviderError, DataError,
                 ValueError, OSError)
    try:
        runtime = CaptureRuntime(cfg)
    except bad_input as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread():
        # systemd stop: finish the frame in hand and exit cleanly; unsent frames stay spooled
        previous = signal.signal(signal.SIGTERM, lambda *_: runtime.stop())
    pending_at_start = runtime.spool.depth()
    try:
        result = runtime.run()
    except KeyboardInterrupt:
        typer.secho("interrupted; unsent frames stay in the spool", err=True)
        raise typer.Exit(130) from None
    except UplinkFatal as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(EXIT_FATAL) from None
    except UplinkCrashed as exc:
        typer.secho(f"error: {exc} (a bug: see the traceback above)", err=True, fg="red")
        raise typer.Exit(EXIT_CRASH) from None
    except bad_input as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    summary = result.to_dict()
    summary.pop("labels")
    typer.echo(f"{result.frames} frames, {result.acked} acked, {result.dropped} dropped, {result.spool_depth} left "
               f"in the spool; {result.fps:.1f} fps, {result.bits_per_frame:.1f} bits/frame, "
               f"peak RSS {result.peak_rss_mb:.0f} MB")
    t = result.temporal or {}
    if t.get("temporal"):
        over = t.get("max_window_over_budget")
        typer.echo(f"temporal: {t['frames_sent']} frames sent, {t['payload_bits_per_frame']:.1f} payload bits/frame "
                   f"({t['wire_bits_per_frame']:.1f} on the wire), SAME {100 * t['same_share']:.0f} %, "
                   f"kinds {t['kinds']}, {t['forced_same']} forced to SAME by the budget, mean L1 distortion "
                   f"{t['l1_distortion_per_frame']:.2f}" + (f"; budget {t['budget_bps']:g} bit/s, max {t['budget_window_s']:g} s "
                                            f"window {over:+.1%}" if over is not None else ""))
    if not result.drained:
        typer.echo(f"{result.spool_depth} frames not acked yet; they stay in {cfg.spool} and are sent next run")
    if profile:
        typer.echo(f"per frame: preprocess {result.preprocess_ms_per_frame:.3f} ms, inference "
                   f"{result.inference_ms_per_frame:.3f} ms, range coding {result.coding_ms_per_frame:.3f} ms "
                   f"({100 * result.coding_share:.1f}% of encode, {100 * result.coding_share_of_frame:.1f}% of frame), "
                   f"spool {result.spool_ms_per_frame:.3f} ms")
    if report is not None:
        report.write_text(json.dumps(summary, indent=2) + "\n")
    if result.acked == 0 and (result.frames > 0 or pending_at_start > 0):
        typer.secho(f"error: nothing was delivered to {cfg.server} ({result.frames} captured, "
                    f"{result.spool_depth} waiting in the spool)", err=True, fg="red")
        raise typer.Exit(EXIT_NOTHING_DELIVERED)


def fw_listen(
    socket: Path = typer.Argument(..., help="unix socket path to listen on"),
    frames: Optional[int] = typer.Option(None, help="stop after this many frames"),
    idle: Optional[float] = typer.Option(None, help="stop after this many seconds without a frame"),
) -> None:
    """Receive frames on SOCKET and print one line per frame (to debug firmware senders without a runtime)."""
    from taskcodec.runtime.fw_source import FrameSocketSource, SourceError

    try:
        source = FrameSocketSource(socket, idle_timeout=idle, max_frames=frames)
    except SourceError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(f"listening on {socket}", err=True)
    with source:
        try:
            for f in source:
                typer.echo(f"frame {f.index}: {f.image.shape[1]}x{f.image.shape[0]}x{f.image.shape[2]} "
                           f"ts_ms={f.ts_ms} label={f.label} mean={f.image.mean():.1f}")
        except KeyboardInterrupt:
            pass
    for err in source.errors:
        typer.echo(f"error: {err}", err=True)


def register(app: typer.Typer) -> None:
    app.command("capture")(capture)
    app.command("fw-listen")(fw_listen)


app = typer.Typer(name="runtime", help="taskcodec edge runtime: capture, encode, spool and stream.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
register(app)


@app.callback()
def _main_callback() -> None:
    """taskcodec edge runtime."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
