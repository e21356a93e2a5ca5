"""`taskcodec bench temporal`: bits per frame and accuracy at the server for temporal coding (KEY / COND / SAME frames,
taskcodec.coding.temporal) against independent per-frame coding and H.264 (PyAV libx264) on the dwell video
(virtual://dwell: objects enter, dwell, move a little and leave, with sensor noise and lighting drift), and accuracy
against a per-camera bandwidth budget.

Offline: frames go through the runtime's own preprocessing, encoder and coder, and the server side is the temporal
decoder plus the bundle's classifier, in one process. Residual tables are fitted on a dwell video of another seed.
Accuracy counts the frames where an object dwells (labelled frames).

End to end: the same test video through the real runtime (`runtime capture`, spool, uplink transcoding to wire v3
TBATCHes) and a real server subprocess (taskcodec.testing.ServerProcess), independent and temporal: payload and
wire bits per frame as the uplink counted them, accuracy from the predictions the server stored.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from taskcodec.bundle import Bundle, load_bundle
from taskcodec.coding import RangeCoder
from taskcodec.coding.temporal import (COND, KEY, SAME, TemporalDecoder, TemporalEncoder, fit_residual_tables,
                                       policy_residuals)
from taskcodec.report import machine_info, machine_line, markdown_table, utc_now, write_json, write_text


def dwell_video(seed: int, frames: int, rate: float, dwell: str, size: int = 112) -> tuple[np.ndarray, list]:
    from taskcodec.runtime.dwell import DwellCamera

    cam = DwellCamera({"count": str(frames), "seed": str(seed), "rate": str(rate), "dwell": dwell,
                       "size": f"{size}x{size}"})
    rendered = [cam.render(k) for k in range(frames)]
    return np.stack([f for f, _ in rendered]), [label for _, label in rendered]


class Pipeline:
    """The camera's preprocessing + encoder and the server's classifier, for one bundle."""

    def __init__(self, bundle: Bundle):
        from taskcodec.runtime.encoder import FrameEncoder
        from taskcodec.runtime.preprocess import Preprocessor
        from taskcodec.server.classify import Classifier

        self.bundle, self.spec = bundle, bundle.input
        self.pre, self.enc, self.cls = Preprocessor(bundle.input), FrameEncoder(bundle), Classifier(bundle)

    def symbols(self, frames: np.ndarray) -> np.ndarray:
        s = self.spec
        x = np.concatenate([self.pre(f).reshape(1, s.height, s.width, s.channels) for f in frames])
        return np.concatenate([self.enc.symbols(x[i:i + 256]) for i in range(0, len(x), 256)])

    def predict(self, symbols: np.ndarray) -> np.ndarray:
        return self.cls.predict(symbols)[0]


def accuracy(pred: np.ndarray, labels: list) -> float:
    mask = np.array([lab is not None for lab in labels])
    truth = np.array([lab if lab is not None else -1 for lab in labels])
    return float((pred[mask] == truth[mask]).mean())


def run_temporal(sym: np.ndarray, key: RangeCoder, res: RangeCoder, tag: bytes, key_interval: int, same_l1: int,
                 budget_bps: float | None = None, fps: float = 5.0, window_s: float = 60.0,
                 payloads: list | None = None):
    """Encode and decode a whole video; returns (payload bytes per frame, decoded symbols, kinds). With a budget, a
    token bucket decides per frame, as the runtime's uplink does: the preferred frame if it fits, else SAME; with no
    reference yet, a key frame on debt. The bucket holds 3 s of budget, so no 60 s window can exceed the budget by
    more than 5 % (plus the first key frame's debt, in the first window). ``payloads``: a list that receives every
    frame's payload."""
    enc, dec = TemporalEncoder(key, res, tag, key_interval, same_l1), TemporalDecoder(key, res, tag)
    sizes, out, kinds = np.zeros(len(sym), np.int64), np.zeros_like(sym), []
    per_frame = budget_bps / fps if budget_bps else None
    depth = 3.0 * budget_bps if budget_bps else 0.0
    tokens = depth
    for i, s in enumerate(sym):
        if per_frame is not None:
            tokens = min(tokens + per_frame, depth)
            trial = copy.copy(enc)
            kind, payload = trial.encode(s)
            if 8 * len(payload) <= tokens or enc.ref is None:
                enc = trial  # fits, or the first key frame (on debt)
            else:
                kind, payload = enc.encode(s, allow=(SAME,))
            tokens -= 8 * len(payload)
        else:
            kind, payload = enc.encode(s)
        sizes[i] = len(payload)
        out[i] = dec.decode(kind, payload)
        kinds.append(kind)
        if payloads is not None:
            payloads.append(payload)
    return sizes, out, kinds


EPOCH = 0x2C5E9B1D4A7F3E61  # a random 63-bit epoch (9 varint bytes, as a real spool's)


def capture_times(n: int, rate: float, jitter_ms: int, seed: int) -> list[int]:
    """Sensor-clock capture times of the dwell video: virtual://dwell?clock=scene&jitter=J."""
    from taskcodec.runtime.dwell import DwellCamera

    cam = DwellCamera({"count": "1", "rate": str(rate), "seed": str(seed), "clock": "scene", "jitter": str(jitter_ms)})
    return [1_700_000_000_000 + cam.scene_ms(k) for k in range(n)]


def wire_bits(kinds: list[int], payloads: list, times: list[int], batch: int, form: str, interval_ms: int) -> float:
    """Whole uplink messages per frame (bits) for a video sent in batches of ``batch`` consecutive frames on one
    connection: ``batch`` v2 BATCH (key frames), ``tbatch`` v3 TBATCH, ``cbatch`` v4 CBATCH (the runtime's choice of
    interval: the most common gap, here ``interval_ms``). Frames not sent (budget) are left out."""
    from taskcodec import wire

    conn, total, n = wire.Connection(), 0, 0
    frames = [wire.Frame(i, t, p, k) for i, (k, p, t) in enumerate(zip(kinds, payloads, times)) if p is not None]
    runs, cur = [], []
    for f in frames:  # consecutive seqs only (a skipped frame ends a batch)
        if cur and (f.seq != cur[-1].seq + 1 or len(cur) == batch):
            runs.append(cur)
            cur = []
        cur.append(f)
    if cur:
        runs.append(cur)
    for run in runs:
        if form == "batch":
            msg = wire.Batch(EPOCH, run)
        elif form == "tbatch":
            msg = wire.TemporalBatch(EPOCH, run)
        else:
            msg = conn.batch(EPOCH, run, interval_ms)
        total += len(msg.encode())
        n += len(run)
    return 8.0 * total / max(n, 1)


def window_rates(sizes: np.ndarray, fps: float, window_s: float) -> list[float]:
    n = int(round(fps * window_s))
    return [8.0 * sizes[i:i + n].sum() / window_s for i in range(0, len(sizes) - n + 1, n)]


def e2e_row(bundle: Bundle, device: str, labels: list, temporal: bool, key_interval: int, same_l1: int,
            max_batch: int, max_delay: float) -> dict[str, Any]:
    """One run of the real runtime against a real server subprocess; the server's stored predictions give the
    accuracy, the uplink's meter the bits (payload, and whole BATCH/TBATCH messages on the wire)."""
    import sqlite3
    import tempfile

    from taskcodec import testing
    from taskcodec.runtime.capture import CaptureConfig, run_capture

    with tempfile.TemporaryDirectory(prefix="bench-temporal-") as tmp:
        db = Path(tmp) / "server.db"
        with testing.ServerProcess(str(bundle.path), db) as srv:
            token = srv.add_camera("bench-cam").decode()
            rep = run_capture(CaptureConfig(
                device=device, bundle=str(bundle.path), server=srv.url, camera_id="bench-cam", token=token,
                spool=str(Path(tmp) / "spool"), quiet=True, temporal=temporal, key_interval=key_interval,
                same_l1=same_l1, max_batch=max_batch, max_delay=max_delay, drain_timeout=300, spool_sync="normal"))
            con = sqlite3.connect(str(db))
            stored = dict(con.execute("SELECT seq, prediction FROM frames WHERE camera_id = 'bench-cam'").fetchall())
            con.close()
    t = rep.temporal
    pred = np.array([stored.get(i, -1) for i in range(len(labels))])
    name = (f"end to end: runtime --temporal --key-interval {key_interval} --same-l1 {same_l1} (CBATCH) -> server"
            if temporal else "end to end: runtime (independent key frames, BATCH) -> server")
    return {"method": name, "bits_per_frame": t["payload_bits_per_frame"], "wire_bits_per_frame":
            t["wire_bits_per_frame"], "accuracy": accuracy(pred, labels), "same": t["same_share"],
            "cond": t["kinds"]["cond"] / max(t["frames_sent"], 1),
            "key": (t["kinds"]["key"] + t["kinds"]["plain"]) / max(t["frames_sent"], 1),
            "frames_stored": len(stored), "frames_sent": t["frames_sent"], "acked": rep.acked,
            "dropped": rep.dropped, "max_batch": max_batch, "max_delay_s": max_delay}


def h264_points(frames: np.ndarray, labels: list, pipe: Pipeline, crfs: list[int], fps: float) -> list[dict]:
    import av

    rows = []
    for crf in crfs:
        out = av.open("/dev/null", "w", format="h264")  # size from the packets themselves
        stream = out.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium", "tune": "zerolatency"}
        packets = []
        for f in frames:
            packets += stream.encode(av.VideoFrame.from_ndarray(f, format="gray"))
        packets += stream.encode(None)
        total = sum(p.size for p in packets)
        out.close()
        codec = av.CodecContext.create("h264", "r")
        decoded = []
        for p in packets:
            for fr in codec.decode(p):
                decoded.append(fr.to_ndarray(format="gray"))
        for fr in codec.decode(None):
            decoded.append(fr.to_ndarray(format="gray"))
        pred = pipe.predict(pipe.symbols(np.stack(decoded)))
        rows.append({"method": f"H.264 CRF {crf}", "bits_per_frame": 8.0 * total / len(frames),
                     "accuracy": accuracy(pred, labels)})
    return rows


def run(bundle_path: str | None, frames: int, rate: float, dwell: str, key_interval: int | list[int],
        same_l1: list[int], budgets: list[float], crfs: list[int], out: Path, seed: int = 1, log=print,
        batch: int = 5, jitter_ms: int = 2) -> dict[str, Any]:
    key_intervals = [key_interval] if isinstance(key_interval, int) else sorted(set(key_interval))
    bundle = load_bundle(bundle_path)
    pipe = Pipeline(bundle)
    log(f"rendering and encoding the training dwell video ({frames} frames)")
    train_frames, _ = dwell_video(seed + 1000, frames, rate, dwell)
    train_sym = pipe.symbols(train_frames)
    diffs = np.diff(train_sym, axis=0)
    key, tag = pipe.enc.coder, bundle.model_tag
    first = RangeCoder(fit_residual_tables(diffs[np.abs(diffs).sum(1) > 0]))
    log("rendering and encoding the validation dwell video (chooses the key interval and SAME threshold)")
    val_frames, val_labels = dwell_video(seed + 2000, frames, rate, dwell)
    val_sym = pipe.symbols(val_frames)
    log(f"rendering and encoding the test dwell video ({frames} frames, seed {seed})")
    test_frames, labels = dwell_video(seed, frames, rate, dwell)
    sym = pipe.symbols(test_frames)
    base_pred = pipe.predict(sym)
    from taskcodec.coding import compress

    interval = int(round(1000 / rate))
    times = capture_times(len(sym), rate, 0, seed)
    jittered = capture_times(len(sym), rate, jitter_ms, seed)
    key_payloads = [compress(s, key, tag) for s in sym]
    all_key = [KEY] * len(sym)
    indep_bits = 8.0 * np.mean([len(p) for p in key_payloads])
    rows = [{"method": "independent (every frame a key frame)", "bits_per_frame": indep_bits,
             "accuracy": accuracy(base_pred, labels), "same": 0.0, "cond": 0.0, "key": 1.0,
             "wire_v2": wire_bits(all_key, key_payloads, times, batch, "batch", interval),
             "wire_v3": wire_bits(all_key, key_payloads, times, batch, "tbatch", interval),
             "wire_v4": wire_bits(all_key, key_payloads, times, batch, "cbatch", interval),
             "wire_v4_jitter": wire_bits(all_key, key_payloads, jittered, batch, "cbatch", interval)}]
    tables, val, test = {}, {}, {}
    val_base = accuracy(pipe.predict(val_sym), val_labels)
    for k_int in key_intervals:
        for tau in same_l1:
            # residual tables fitted per policy: the residuals COND frames see against the reference (training video)
            tables[k_int, tau] = res = RangeCoder(fit_residual_tables(policy_residuals(train_sym, key, first, tag,
                                                                                        k_int, tau)))
            v_sizes, v_decoded, _ = run_temporal(val_sym, key, res, tag, k_int, tau)
            val[k_int, tau] = (8.0 * v_sizes.mean(), accuracy(pipe.predict(v_decoded), val_labels))
            payloads: list = []
            sizes, decoded, kinds = run_temporal(sym, key, res, tag, k_int, tau, payloads=payloads)
            k = np.array(kinds)
            test[k_int, tau] = {
                "method": f"temporal, key every {k_int}, SAME if L1 <= {tau}", "key_interval": k_int, "same_l1": tau,
                "bits_per_frame": 8.0 * sizes.mean(), "accuracy": accuracy(pipe.predict(decoded), labels),
                "same": float((k == SAME).mean()), "cond": float((k == COND).mean()), "key": float((k == KEY).mean()),
                "wire_v3": wire_bits(kinds, payloads, times, batch, "tbatch", interval),
                "wire_v4": wire_bits(kinds, payloads, times, batch, "cbatch", interval),
                "wire_v4_jitter": wire_bits(kinds, payloads, jittered, batch, "cbatch", interval)}
            log(f"  K={k_int} L1<={tau}: validation {val[k_int, tau][0]:.2f} bits {100 * val[k_int, tau][1]:.2f} %; "
                f"test {test[k_int, tau]['bits_per_frame']:.2f} bits {100 * test[k_int, tau]['accuracy']:.2f} %")
    # (key interval, SAME threshold) chosen on the validation video: the fewest bits within 0.5 point of
    # independent coding there; the test video's numbers are read once, for the chosen pair
    ok = [c for c in val if val[c][1] >= val_base - 0.005] or [min(val)]
    chosen = min(ok, key=lambda c: (val[c][0], c))
    rows += [test[chosen[0], tau] for tau in same_l1]
    best_tau = test[chosen]
    log("H.264 (libx264) at several CRFs")
    h264 = h264_points(test_frames, labels, pipe, crfs, rate)
    # end to end through the real runtime and server (the product path; residual tables: the bundle's shipped ones)
    e2e = []
    if bundle.residual_tables is not None:
        device = (f"virtual://dwell?count={frames}&seed={seed}&rate={rate:g}&dwell={dwell}&size=112x112"
                  "&clock=scene")
        for temporal, jitter in ((False, 0), (True, 0), (True, jitter_ms)):
            log(f"end to end ({'temporal' if temporal else 'independent'}, jitter {jitter} ms): runtime -> real "
                f"server, {frames} frames")
            e2e.append(e2e_row(bundle, device + (f"&jitter={jitter}" if jitter else ""), labels, temporal,
                               chosen[0], chosen[1], batch, 1.0))
            if jitter:
                e2e[-1]["method"] += f", capture times ±{jitter} ms jitter"
            log(f"  {e2e[-1]['method']}: {e2e[-1]['bits_per_frame']:.1f} payload / "
                f"{e2e[-1]['wire_bits_per_frame']:.1f} wire bits/frame, {100 * e2e[-1]['accuracy']:.2f} %")
    budget_rows = []
    for b in budgets:
        sizes, decoded, kinds = run_temporal(sym, key, tables[chosen], tag, chosen[0], chosen[1], b, rate)
        rates = window_rates(sizes, rate, 60.0)
        budget_rows.append({"budget_bps": b, "accuracy": accuracy(pipe.predict(decoded), labels),
                            "bits_per_frame": 8.0 * sizes.mean(), "max_window_bps": max(rates) if rates else None,
                            "max_window_over_budget": (max(rates) / b - 1.0) if rates else None,
                            "skipped": float(np.mean(np.array(kinds) == -1))})
        log(f"  budget {b:g} bit/s: {100 * budget_rows[-1]['accuracy']:.2f} %, max 60 s window "
            f"{budget_rows[-1]['max_window_bps']:.1f} bit/s")
    result = {"machine": machine_info(), "time": utc_now(), "bundle": bundle.model_id, "frames": frames,
              "fps": rate, "dwell_s": dwell, "labelled_share": float(np.mean([lab is not None for lab in labels])),
              "batch_frames": batch, "jitter_ms": jitter_ms,
              "rows": rows, "h264": h264, "e2e": e2e,
              "validation": [{"key_interval": c[0], "same_l1": c[1], "bits_per_frame": b, "accuracy": a,
                              "accuracy_vs_independent_points": 100 * (a - val_base)}
                             for c, (b, a) in sorted(val.items())],
              "test_grid": [test[c] for c in sorted(test)],
              "validation_independent_accuracy": val_base, "budget": budget_rows,
              "chosen_key_interval": chosen[0], "chosen_same_l1": chosen[1],
              "gain_vs_independent": indep_bits / best_tau["bits_per_frame"],
              "wire_gain_vs_independent": rows[0]["wire_v2"] / best_tau["wire_v4"],
              "accuracy_loss_points": 100 * (rows[0]["accuracy"] - best_tau["accuracy"])}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "temporal.json", result)
    write_text(out / "temporal.md", markdown(result))
    plot(result, out / "temporal.png")
    return result


def markdown(r: dict[str, Any]) -> str:
    cols = [("method", "method"), ("bits_per_frame", "payload bits/frame"), ("accuracy", "accuracy at server"),
            ("same", "SAME share"), ("cond", "COND share"), ("key", "KEY share"),
            ("wire_v2", "wire v2 BATCH"), ("wire_v3", "wire v3 TBATCH"), ("wire_v4", "wire v4 CBATCH"),
            ("wire_v4_jitter", f"v4 CBATCH, ±{r['jitter_ms']} ms jitter")]
    fmt = {"bits_per_frame": ".1f", "accuracy": ".4f", "same": ".2f", "cond": ".2f", "key": ".2f", "wire_v2": ".1f",
           "wire_v3": ".1f", "wire_v4": ".1f", "wire_v4_jitter": ".1f"}
    vcols = [("key_interval", "key interval"), ("same_l1", "SAME if L1 <="), ("bits_per_frame", "bits/frame"),
             ("accuracy", "accuracy"), ("accuracy_vs_independent_points", "vs independent (points)")]
    bcols = [("budget_bps", "budget bit/s"), ("accuracy", "accuracy"), ("bits_per_frame", "bits/frame"),
             ("max_window_bps", "max 60 s window bit/s"), ("max_window_over_budget", "over budget"),
             ("skipped", "frames not sent")]
    best = next(x for x in r["rows"][1:] if x.get("same_l1") == r["chosen_same_l1"])
    ind = r["rows"][0]
    return (f"# Temporal coding on the dwell video\n\n{machine_line(r['machine'])}; {r['time']}; bundle {r['bundle']}; "
            f"{r['frames']} frames at {r['fps']:g} fps, dwell {r['dwell_s']} s, {100 * r['labelled_share']:.0f} % of "
            "frames with a dwelling object (accuracy is over those). Offline: runtime preprocessing, encoder and "
            "coder; temporal decoder and bundle classifier as the server side. Command: `taskcodec bench temporal`."
            "\n\nThe key interval and SAME threshold are chosen together on a validation video (another seed): the "
            "fewest bits within 0.5 point of independent coding there; the test video is seen once. Residual tables "
            "are fitted per policy on a training video (a third seed).\n\n"
            f"**Chosen: key every {r['chosen_key_interval']}, SAME if L1 <= {r['chosen_same_l1']}: "
            f"{r['gain_vs_independent']:.2f}x fewer payload bits than independent coding "
            f"({best['bits_per_frame']:.2f} vs {ind['bits_per_frame']:.2f}) at {r['accuracy_loss_points']:.2f} points "
            f"accuracy loss (negative: a gain); on the wire {r['wire_gain_vs_independent']:.2f}x "
            f"({best['wire_v4']:.1f} bits/frame as v4 CBATCH vs {ind['wire_v2']:.1f} as v2 BATCH).**\n\n"
            f"Wire columns: whole uplink messages per frame (bits), the video sent in batches of {r['batch_frames']} "
            "consecutive frames (1 s at 5 fps) on one connection, capture times from the sensor clock (200 ms apart; "
            f"last column: each time off by a random -{r['jitter_ms']}..{r['jitter_ms']} ms); without WebSocket/TCP "
            "framing. The independent row's v3/v4 columns show what the new framing alone gives key frames.\n\n"
            + markdown_table(r["rows"] + r["h264"], cols, fmt) + e2e_markdown(r)
            + "\n\n## Validation video (chooses the pair)\n\n"
            + f"Independent coding there: {100 * r['validation_independent_accuracy']:.2f} %.\n\n"
            + markdown_table(r["validation"], vcols, {"bits_per_frame": ".2f", "accuracy": ".4f",
                                                       "accuracy_vs_independent_points": "+.2f"})
            + "\n\n## Bandwidth budget (token bucket, 3 s of budget deep)\n\n"
            + markdown_table(r["budget"], bcols, {"accuracy": ".4f", "bits_per_frame": ".2f", "max_window_bps": ".1f",
                                                  "max_window_over_budget": "+.1%", "skipped": ".3f"}) + "\n")


def e2e_markdown(r: dict[str, Any]) -> str:
    rows = r.get("e2e") or []
    if not rows:
        return ""
    cols = [("method", "method"), ("bits_per_frame", "payload bits/frame"), ("wire_bits_per_frame", "wire bits/frame"),
            ("accuracy", "accuracy at server"), ("same", "SAME share"), ("frames_stored", "frames stored")]
    ind = next((x for x in rows if "independent" in x["method"]), None)
    tmp = next((x for x in rows if "--temporal" in x["method"]), None)
    gain = ""
    if ind and tmp:
        gain = (f"**End to end: {ind['bits_per_frame'] / tmp['bits_per_frame']:.2f}x fewer payload bits "
                f"({ind['wire_bits_per_frame'] / tmp['wire_bits_per_frame']:.2f}x fewer wire bits) at "
                f"{100 * (ind['accuracy'] - tmp['accuracy']):.2f} points accuracy loss at the server.**\n\n")
    return ("\n\n## End to end: real runtime and server\n\n"
            "The test video (`virtual://dwell?...&clock=scene`: sensor-clock capture times 200 ms apart; the last "
            "row adds `&jitter=J`: each time off by -J..J ms) through "
            "`runtime capture` (spool, uplink; independent: v2 BATCH; temporal: wire v4 CBATCH, transcoded per "
            "connection with the bundle's shipped residual tables) and a real server subprocess; accuracy from the "
            f"predictions the server stored. Batches of up to {rows[0]['max_batch']} frames "
            "(the uplink sends what the spool holds, so batches may be shorter); wire bits are whole BATCH/CBATCH "
            "messages per frame as the uplink counted them, without WebSocket/TCP framing.\n\n" + gain
            + markdown_table(rows, cols, {"bits_per_frame": ".1f", "wire_bits_per_frame": ".1f", "accuracy": ".4f",
                                          "same": ".2f"}))


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for rows, style, name in ((r["rows"][:1], "s", "independent"), (r["rows"][1:], "o-", "temporal (SAME L1 sweep)"),
                              (r["h264"], "^-", "H.264 (CRF sweep)")):
        a.plot([x["bits_per_frame"] for x in rows], [100 * x["accuracy"] for x in rows], style, label=name)
    for x, color in zip(r.get("e2e") or [], ("k", "r")):
        what = "temporal" if "--temporal" in x["method"] else "independent"
        a.plot([x["bits_per_frame"]], [100 * x["accuracy"]], "D", color=color, label=f"end to end, {what}: payload")
        a.plot([x["wire_bits_per_frame"]], [100 * x["accuracy"]], "D", mfc="none", color=color,
               label=f"end to end, {what}: wire (BATCH framing)")
    a.set_xscale("log")
    a.set_xlabel("bits per frame")
    a.set_ylabel("accuracy at server (%)")
    a.legend(fontsize=7, loc="lower right")
    a.set_title("rate vs accuracy, dwell video")
    b.plot([x["budget_bps"] for x in r["budget"]], [100 * x["accuracy"] for x in r["budget"]], "o-")
    b.set_xscale("log")
    b.set_xlabel("budget (bit/s per camera)")
    b.set_ylabel("accuracy at server (%)")
    b.set_title("accuracy vs bandwidth budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
