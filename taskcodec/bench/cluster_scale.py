"""`taskcodec bench cluster-scale`: many simulated one-fps cameras through the local scale-out cluster for minutes.

Issue 12 asks for 10,000 one-fps cameras for 5 minutes with p99 capture→stored < 1 s where this machine's CPU allows,
and what limited it where it does not. Every camera is a WebSocket connection (one HELLO, then one BATCH of one frame
per second, waiting for the ACK, as a camera with batching off); the capture time written in a frame is the time the
frame was due (its capture), so a camera that falls behind sends older frames and the queueing counts as latency.
The load generator runs in separate processes (uvloop where installed), the cluster is `LocalCluster` (3 nats-server
nodes, JetStream R3, PostgreSQL, gateways, workers) on the same machine.

Recorded: frames offered (due) / sent / acked per second by the cameras, frames stored per second (PostgreSQL's
insert counter), CPU per process group (gateways, workers, nats-server, PostgreSQL, load generator, everything else
on the machine) every few seconds, capture→stored latency per frame from PostgreSQL (``stored_ms_after``; a SMALLINT
that saturated at 32.767 s before PostgreSQL schema step 3, so the runs recorded before it have lower bounds there), and acked-not-stored per camera after the
workers drained the backlog.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import resource
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer

from taskcodec import wire
from taskcodec.report import machine_info, machine_line, markdown_table, utc_now, write_json, write_text

LATENCY_CAP_MS = 2**31 - 1  # frames.stored_ms_after is an INTEGER (taskcodec.server.cluster.pgstore, step 3)
SAMPLE_S = 2.0


async def _camera(url: str, cam: str, token: bytes, tag: bytes, payloads: list[bytes], t0: float, seconds: float,
                  connect_spread: float, stats: dict[str, Any]) -> None:
    """One one-fps camera: frames are due every second from t0 on; one BATCH of one frame per message, the next only
    after the ACK (a camera that falls behind sends its queue in order). BUSY or a lost connection: reconnect after
    1-3 s and re-send the unacknowledged frame, as `runtime capture` would."""
    import websockets

    await asyncio.sleep(max(0.0, t0 - connect_spread - time.time()) + random.random() * connect_spread * 0.8)
    epoch, seq, phase = random.getrandbits(62), 0, random.random()
    end = t0 + seconds
    first = True
    while time.time() < end + 30:
        if not first:
            stats["reconnects"] += 1
            await asyncio.sleep(1.0 + 2.0 * random.random())
        first = False
        try:
            async with websockets.connect(url, max_size=None, open_timeout=120, ping_interval=None,
                                          compression=None, close_timeout=5) as ws:
                await ws.send(wire.Hello(tag, cam, token).encode())
                reply = wire.decode(await asyncio.wait_for(ws.recv(), 120))
                if not isinstance(reply, wire.Welcome):
                    stats["refusals"][repr(reply)[:200]] = stats["refusals"].get(repr(reply)[:200], 0) + 1
                    if isinstance(reply, wire.Error) and reply.code == wire.Code.BUSY:
                        continue
                    stats["refused"] += 1
                    return
                if seq == 0:
                    stats["connected"] += 1
                while True:
                    due = t0 + seq + phase  # frame seq's capture time
                    if due >= end or time.time() >= end:
                        return  # frames still due at the end stay in the camera's queue
                    delay = due - time.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    now = time.time()
                    await ws.send(wire.Batch(epoch, [wire.Frame(seq, int(due * 1000),
                                                                payloads[seq % len(payloads)])]).encode())
                    stats["sent_s"][int(now - t0)] += 1
                    try:  # bounded: the window's end plus 30 s for the last ACK
                        raw = await asyncio.wait_for(ws.recv(), max(0.0, end - time.time()) + 30.0)
                    except asyncio.TimeoutError:
                        return
                    reply = wire.decode(raw)
                    if not isinstance(reply, wire.Ack):
                        stats["refusals"][repr(reply)[:200]] = stats["refusals"].get(repr(reply)[:200], 0) + 1
                        if isinstance(reply, wire.Error) and reply.code == wire.Code.BUSY:
                            break  # reconnect, re-send this frame
                        stats["other"] += 1
                        return
                    stats["acked"] += 1
                    stats["acked_s"][min(int(time.time() - t0), len(stats["acked_s"]) - 1)] += 1
                    stats["ack_ms"].append(int(1000 * time.time() - due * 1000))
                    stats["ack_capture_s"].append(int(due - t0))
                    stats["acked_by_camera"][cam] = (epoch, seq + 1)
                    seq += 1
        except (OSError, asyncio.TimeoutError, websockets.ConnectionClosed, websockets.InvalidHandshake) as exc:
            key = type(exc).__name__
            stats["connection_errors"][key] = stats["connection_errors"].get(key, 0) + 1


def _load_process(url_list: list[str], cams: list[tuple[str, bytes]], tag: bytes, payloads: list[bytes], t0: float,
                  seconds: float, connect_spread: float, out: mp.Queue) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    n_s = int(seconds) + 120
    stats: dict[str, Any] = {"connected": 0, "acked": 0, "other": 0, "refused": 0, "errors": 0, "ack_ms": [],
                             "ack_capture_s": [],
                             "refusals": {}, "reconnects": 0, "connection_errors": {},
                             "sent_s": [0] * n_s, "acked_s": [0] * n_s, "acked_by_camera": {}}

    async def main():
        results = await asyncio.gather(*(_camera(url_list[i % len(url_list)], c, t, tag, payloads, t0, seconds,
                                                 connect_spread, stats) for i, (c, t) in enumerate(cams)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        stats["errors"] = len(errors)
        stats["first_error"] = repr(errors[0]) if errors else None

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    stats["ack_ms"] = np.asarray(stats["ack_ms"], dtype=np.int32)
    stats["ack_capture_s"] = np.asarray(stats["ack_capture_s"], dtype=np.int16)
    out.put(stats)


def _mqtt_load_process(broker: str, cams: list[tuple[str, bytes]], tag: bytes, payloads: list[bytes], t0: float,
                       seconds: float, connect_spread: float, out: mp.Queue) -> None:
    """``--mqtt``: this process's cameras publish over ONE MQTT connection (QoS 1, up to 10,000 in flight), each
    message HELLO || BATCH of one frame on the camera's own topic; PUBACKs are counted as ACKs. One connection per
    process, not per camera: paho runs a thread per connection, and a worker authenticates each message anyway."""
    import paho.mqtt.client as mqtt

    from taskcodec.runtime.mqtt_uplink import ingest_topic

    n_s = int(seconds) + 120
    stats: dict[str, Any] = {"connected": 0, "acked": 0, "other": 0, "refused": 0, "errors": 0, "ack_ms": [],
                             "ack_capture_s": [], "refusals": {}, "reconnects": 0, "connection_errors": {},
                             "sent_s": [0] * n_s, "acked_s": [0] * n_s, "acked_by_camera": {}, "first_error": None}
    url = broker.split("://", 1)[1]
    host, port = url.rsplit(":", 1)
    pending: dict[int, tuple[str, int, float]] = {}
    epochs = {cam: random.getrandbits(62) for cam, _ in cams}
    acked_n = {cam: 0 for cam, _ in cams}
    lock = threading.Lock()

    early: dict[int, float] = {}  # PUBACKs that arrived before publish() returned the mid

    def acked(item, now):
        cam, seq, due = item
        stats["acked"] += 1
        stats["acked_s"][min(int(now - t0), n_s - 1)] += 1
        stats["ack_ms"].append(int(1000 * (now - due)))
        stats["ack_capture_s"].append(int(due - t0))
        acked_n[cam] += 1

    def on_publish(client, userdata, mid, reason_code=None, properties=None):
        now = time.time()
        with lock:  # never held around a paho call (paho holds its own locks while calling back)
            item = pending.pop(mid, None)
            if item is None:
                early[mid] = now
            else:
                acked(item, now)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}", clean_session=True)
    client.max_inflight_messages_set(10_000)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect(host, int(port))
    client.loop_start()
    stats["connected"] = len(cams)
    phases = sorted((random.random(), cam, token) for cam, token in cams)
    hellos = {cam: wire.Hello(tag, cam, token).encode() for cam, token in cams}
    time.sleep(max(0.0, t0 - time.time()))
    for sec in range(int(seconds)):
        for phase, cam, _ in phases:
            due = t0 + sec + phase
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            if time.time() >= t0 + seconds:
                break
            body = hellos[cam] + wire.Batch(epochs[cam], [wire.Frame(sec, int(due * 1000),
                                                                     payloads[sec % len(payloads)])]).encode()
            info = client.publish(ingest_topic(cam), body, qos=1)
            with lock:
                now = early.pop(info.mid, None)
                if now is None:
                    pending[info.mid] = (cam, sec, due)
                else:
                    acked((cam, sec, due), now)
            stats["sent_s"][int(time.time() - t0)] += 1
    deadline = time.time() + 30
    while pending and time.time() < deadline:
        time.sleep(0.1)
    client.loop_stop()
    client.disconnect()
    stats["acked_by_camera"] = {cam: (epochs[cam], n) for cam, n in acked_n.items() if n}
    stats["ack_ms"] = np.asarray(stats["ack_ms"], dtype=np.int32)
    stats["ack_capture_s"] = np.asarray(stats["ack_capture_s"], dtype=np.int16)
    out.put(stats)


def _group_cpu(groups: dict[str, list[int]]) -> dict[str, float]:
    from taskcodec.bench.cluster import _cpu_seconds

    return {name: _cpu_seconds(pids) for name, pids in groups.items()}


def _inserted(conn) -> int:
    """Rows PostgreSQL inserted into the frames partitions (its statistics counter: cheap, ~1 s behind)."""
    row = conn.execute("SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables "
                       "WHERE relname LIKE 'frames\\_%%'").fetchone()
    return int(row[0])


def run(bundle_path: str | None, cameras: int, seconds: float, gateways: int, workers: int, load_procs: int,
        out: Path, name: str = "cluster_10k", drain_s: float = 300.0, log=print, mqtt: bool = False) -> dict[str, Any]:
    from taskcodec.bench.cluster import real_payloads, register_cameras
    from taskcodec.bundle import load_bundle
    from taskcodec.server.cluster.local import LocalCluster

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # gateways inherit it: cameras / gateways sockets each
    need = cameras // max(gateways, 1) + 1000
    if hard < need:
        raise RuntimeError(f"ulimit -n is {hard}: {need} file descriptors needed per gateway")
    bundle = load_bundle(bundle_path)
    payloads = real_payloads(bundle)
    connect_spread = max(10.0, cameras / 500.0)
    log(f"{cameras} one-fps cameras, {gateways} gateway(s), {workers} worker(s), {load_procs} load processes, "
        f"{seconds:.0f} s (connections spread over {connect_spread:.0f} s first)")
    if mqtt:
        connect_spread, gateways = 5.0, 0
        log("  over MQTT: nats-server's MQTT listeners, one connection per load process, QoS 1")
    with LocalCluster([bundle.path], gateways=0 if mqtt else gateways, workers=workers) as c:
        cams = register_cameras(c.pg_dsn, cameras)
        urls = [c.gateway_url(i).replace("http://", "ws://") + "/v1/stream" for i in range(gateways)]
        ctx = mp.get_context("spawn")
        q: mp.Queue = ctx.Queue()
        t0 = time.time() + connect_spread + 10.0
        if mqtt:
            procs = [ctx.Process(target=_mqtt_load_process, args=(c.mqtt_url(p % c.n_nats), cams[p::load_procs],
                                                                  bundle.model_tag, payloads, t0, seconds,
                                                                  connect_spread, q)) for p in range(load_procs)]
        else:
            procs = [ctx.Process(target=_load_process, args=(urls, cams[p::load_procs], bundle.model_tag, payloads,
                                                             t0, seconds, connect_spread, q))
                     for p in range(load_procs)]
        for p in procs:
            p.start()
        try:
            return _measure(c, procs, q, t0, seconds, drain_s, cameras, gateways, workers, load_procs, bundle,
                            payloads, out, name, log, "mqtt" if mqtt else "websocket")
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()  # a load process blocked on its result queue after an interrupt


def _measure(c, procs, q, t0, seconds, drain_s, cameras, gateways, workers, load_procs, bundle, payloads, out, name,
             log, ingress: str) -> dict[str, Any]:
    import psutil
    import psycopg

    from taskcodec.bench.cluster import _postgres_pids

    groups = {"gateways": [g[0].pid for g in c.gateways], "workers": [w.pid for w in c.workers],
              "nats-server (3)": [n.pid for n in c.nats], "postgres": _postgres_pids(c),
              "load generator": [p.pid for p in procs]}
    conn = psycopg.connect(c.pg_dsn, autocommit=True)
    series: list[dict[str, Any]] = []
    prev_cpu, prev_sys, prev_t = _group_cpu(groups), psutil.cpu_times(), time.time()
    end = t0 + seconds
    drained_at = None
    drain_s_used = None
    acked_goal = None
    results: list[dict[str, Any]] = []
    while True:
        time.sleep(SAMPLE_S)
        now = time.time()
        groups["postgres"] = _postgres_pids(c)  # backends come and go
        cpu, sys_t = _group_cpu(groups), psutil.cpu_times()
        dt = now - prev_t
        busy = lambda t: t.user + t.system + t.nice + getattr(t, "irq", 0) + getattr(t, "softirq", 0)  # noqa: E731
        used = {k: max(0.0, cpu[k] - prev_cpu.get(k, cpu[k])) / dt for k in cpu}
        machine = (busy(sys_t) - busy(prev_sys)) / dt
        used["other processes (other jobs, this bench)"] = max(0.0, machine - sum(used.values()))
        series.append({"t": round(now - t0, 1), "stored_total": _inserted(conn), "cores": used,
                       "machine_cores": machine, "load_avg": os.getloadavg()[0]})
        prev_cpu, prev_sys, prev_t = cpu, sys_t, now
        if len(series) % 15 == 0:
            log(f"  t={now - t0:6.0f} s  stored {series[-1]['stored_total']:,}  machine {machine:.2f} cores  "
                + "  ".join(f"{k} {v:.2f}" for k, v in used.items()))
        if now > end and drained_at is None:
            while len(results) < len(procs) and not q.empty():
                results.append(q.get())
            if len(results) == len(procs):
                acked_goal = sum(r["acked"] for r in results)
                log(f"  load done: {acked_goal:,} acked; draining")
                drained_at = now
            elif now > end + 120:
                raise RuntimeError("the load generator did not report within 120 s after the window")
        if drained_at is not None:
            exact = (len(series) % 3 == 0 and conn.execute(
                "SELECT count(*) FROM frames WHERE camera_id LIKE 'sim-%'").fetchone()[0] >= acked_goal)
            if exact or series[-1]["stored_total"] >= acked_goal or now - drained_at > drain_s:
                time.sleep(2.0)  # the statistics counter runs ~1 s behind: the exact counts are read below
                drain_s_used = round(now - drained_at, 1)
                break
    for p in procs:
        p.join(timeout=30)
    summary = _from_db(conn, results, t0, seconds)
    summary["drain_s"] = drain_s_used
    conn.close()
    return _finish(summary, results, series, cameras, seconds, gateways, workers, load_procs, bundle, payloads,
                   out, name, log, ingress)


def _from_db(conn, results: list[dict[str, Any]], t0: float, seconds: float) -> dict[str, Any]:
    acked = {cam: v for r in results for cam, v in r["acked_by_camera"].items()}
    conn.execute("CREATE TEMP TABLE acked (camera_id TEXT, epoch BIGINT, n BIGINT)")
    with conn.cursor().copy("COPY acked FROM STDIN") as cp:
        for cam, (epoch, n) in acked.items():
            cp.write_row((cam, epoch, n))
    # acked-not-stored: frames 0..n-1 of each camera's epoch that the camera saw acked but PostgreSQL lacks
    missing = conn.execute("""SELECT coalesce(sum(a.n - coalesce(f.k, 0)), 0) FROM acked a LEFT JOIN
                              (SELECT camera_id, epoch, count(*) k FROM frames f0 JOIN acked a0 USING (camera_id, epoch)
                               WHERE f0.seq < a0.n GROUP BY 1, 2) f USING (camera_id, epoch)""").fetchone()[0]
    stored, distinct = conn.execute("SELECT count(*), count(DISTINCT (camera_id, epoch, seq)) FROM frames "
                                    "WHERE camera_id LIKE 'sim-%'").fetchone()
    lat = np.array([r[0] for r in conn.execute("SELECT stored_ms_after FROM frames WHERE camera_id LIKE 'sim-%%' "
                                               "AND ts_capture >= to_timestamp(%s) AND ts_capture < to_timestamp(%s)",
                                               (t0, t0 + seconds))], dtype=np.float64)
    per_s = conn.execute("""SELECT floor(extract(epoch FROM ts_capture) - %s)::int s, count(*),
                                   percentile_disc(0.5) WITHIN GROUP (ORDER BY stored_ms_after),
                                   percentile_disc(0.99) WITHIN GROUP (ORDER BY stored_ms_after)
                            FROM frames WHERE camera_id LIKE 'sim-%%' GROUP BY 1 ORDER BY 1""", (t0,)).fetchall()
    return {"acked_not_stored": int(missing), "stored_in_window": int(len(lat)), "stored": int(stored), "stored_distinct": int(distinct),
            "latency_ms": lat, "per_capture_second": [{"s": r[0], "frames": r[1], "p50_ms": r[2], "p99_ms": r[3]}
                                                      for r in per_s]}


def _finish(db: dict[str, Any], results, series, cameras, seconds, gateways, workers, load_procs, bundle, payloads,
            out: Path, name: str, log, ingress: str = "websocket") -> dict[str, Any]:
    lat = db.pop("latency_ms")
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: None)
    window = [s for s in series if 0 <= s["t"] <= seconds]
    cores = {k: float(np.mean([s["cores"][k] for s in window])) for k in (window[0]["cores"] if window else {})}
    sent = np.sum([r["sent_s"] for r in results], axis=0)
    acked_s = np.sum([r["acked_s"] for r in results], axis=0)
    stored_total = [s["stored_total"] for s in series]
    stored_rate = [(b["stored_total"] - a["stored_total"]) / max(b["t"] - a["t"], 1e-9)
                   for a, b in zip(series, series[1:])]
    in_window = [r for s, r in zip(series[1:], stored_rate) if 0 <= s["t"] <= seconds]
    acked_total = sum(r["acked"] for r in results)
    ack = np.concatenate([r.pop("ack_ms") for r in results]) if results else np.zeros(0)
    ack_s = np.concatenate([r.pop("ack_capture_s") for r in results]) if results else np.zeros(0)
    ack_per_s = [{"s": int(sec), "p50_ms": float(np.percentile(ack[ack_s == sec], 50)),
                  "p99_ms": float(np.percentile(ack[ack_s == sec], 99))} for sec in np.unique(ack_s)]
    server = ("gateways", "workers", "nats-server (3)", "postgres")
    result = {
        "machine": machine_info(), "time": utc_now(), "bundle": bundle.model_id,
        "payload_bytes_mean": float(np.mean([len(p) for p in payloads])),
        "config": {"cameras": cameras, "seconds": seconds, "gateways": gateways, "workers": workers,
                   "load_processes": load_procs, "nats_nodes": 3, "jetstream_replicas": 3, "ingress": ingress},
        "connected": sum(r["connected"] for r in results), "refused": sum(r["refused"] for r in results),
        "errors": sum(r["errors"] for r in results), "other_replies": sum(r["other"] for r in results),
        "refusals": {k: sum(r["refusals"].get(k, 0) for r in results) for r in results for k in r["refusals"]},
        "reconnects": sum(r["reconnects"] for r in results),
        "connection_errors": {k: sum(r["connection_errors"].get(k, 0) for r in results) for r in results
                              for k in r["connection_errors"]},
        "first_error": next((r["first_error"] for r in results if r.get("first_error")), None),
        "ack_ms": {"p50": float(np.percentile(ack, 50)) if len(ack) else None,
                   "p99": float(np.percentile(ack, 99)) if len(ack) else None},
        "offered_frames_per_s": float(cameras),
        "drain_s": db["drain_s"],
        "sent_frames_per_s": float(np.sum(sent[:int(seconds)]) / seconds),
        "acked_frames_per_s": float(np.sum(acked_s[:int(seconds)]) / seconds),
        "stored_frames_per_s": db["stored_in_window"] / seconds,  # frames captured in the window that were stored
        "stored_frames_per_s_during_window": float(np.mean(in_window)) if in_window else None,
        "offered_frames": int(cameras * seconds), "acked_frames": acked_total, "stored_frames": db["stored"],
        "stored_distinct": db["stored_distinct"], "acked_not_stored": db["acked_not_stored"],
        "capture_to_stored_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": pct(100),
                                 "frames": int(len(lat)), "share_at_cap": float(np.mean(lat >= LATENCY_CAP_MS))
                                 if len(lat) else None},
        "cores_mean_in_window": cores,
        "server_cpu_us_per_acked_frame": 1e6 * sum(cores.get(k, 0.0) for k in server)
                                         / max(float(np.sum(acked_s[:int(seconds)]) / seconds), 1e-9),
        "machine_cores_mean_in_window": float(np.mean([s["machine_cores"] for s in window])) if window else None,
        "load_avg_max": max(s["load_avg"] for s in series),
        "series": {"sample_t": [s["t"] for s in series], "stored_total": stored_total,
                   "cores": [s["cores"] for s in series], "sent_per_s": sent.tolist(), "acked_per_s": acked_s.tolist(),
                   "per_capture_second": db["per_capture_second"], "ack_per_capture_second": ack_per_s},
    }
    result["limited_by"] = _verdict(result)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", result)
    write_text(out / f"{name}.md", markdown(result))
    plot(result, out / f"{name}.png")
    log(markdown(result))
    return result


def _verdict(r: dict[str, Any]) -> str:
    p99 = r["capture_to_stored_ms"]["p99"]
    machine = r["machine_cores_mean_in_window"] or 0.0
    ncpu = r["machine"].get("usable_cores") or os.cpu_count() or 1
    cores = r["cores_mean_in_window"]
    top = sorted(cores.items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{k} {v:.2f}" for k, v in top)
    us = r["server_cpu_us_per_acked_frame"]
    need = us * r["offered_frames_per_s"] / 1e6
    if p99 is not None and p99 < 1000 and r["stored_frames_per_s"] >= 0.98 * r["offered_frames_per_s"]:
        return f"kept up (p99 {p99:.0f} ms); cores used: {parts}"
    text = (f"CPU: the machine's {ncpu} cores were {100 * machine / ncpu:.0f} % busy during the window"
            if machine >= 0.9 * ncpu else f"not the whole machine's CPU ({machine:.2f} of {ncpu} cores busy)")
    text += (f"; cores by process group: {parts}. The server side (gateways, workers, nats-server, PostgreSQL) "
             f"used {us:.0f} µs of CPU per acked frame, so {r['offered_frames_per_s']:.0f} frames/s need about "
             f"{need:.1f} cores for it alone, while it got "
             f"{sum(cores.get(k, 0.0) for k in ('gateways', 'workers', 'nats-server (3)', 'postgres')):.2f} "
             f"(the load generator on the same cores took {cores.get('load generator', 0.0):.2f})")
    if r["acked_frames_per_s"] > 1.1 * (r["stored_frames_per_s_during_window"] or 0):
        text += ("; acked frames/s exceeded stored frames/s during the window: the workers fell behind and JetStream "
                 "held the backlog until they drained it after the load")
    return text


def markdown(r: dict[str, Any]) -> str:
    c, lat = r["config"], r["capture_to_stored_ms"]

    def ms(v, cap=True):
        if v is None:
            return "–"
        if cap and v >= LATENCY_CAP_MS:
            return f"≥ {v / 1000:.1f} s (cap)"
        return f"{v:.0f} ms" if v < 10_000 else f"{v / 1000:.1f} s"

    rows = [{"what": "offered (due) frames/s", "value": f"{r['offered_frames_per_s']:.0f}"},
            {"what": "sent frames/s (cameras wait for each ACK)", "value": f"{r['sent_frames_per_s']:.0f}"},
            {"what": "acked frames/s", "value": f"{r['acked_frames_per_s']:.0f}"},
            {"what": "stored frames/s (captured in the window and stored, drain included)",
             "value": f"{r['stored_frames_per_s']:.0f}"},
            {"what": "stored frames/s during the window (PostgreSQL insert counter)",
             "value": f"{r['stored_frames_per_s_during_window'] or 0:.0f}"},
            {"what": "cameras connected / refused / other replies / errors",
             "value": f"{r['connected']} / {r['refused']} / {r['other_replies']} / {r['errors']}"},
            {"what": "server refusals (cameras reconnect after BUSY) / reconnects / connection errors",
             "value": (f"{'; '.join(f'{n}× {k}' for k, n in r['refusals'].items())}" if r['refusals'] else "none")
                      + f" / {r['reconnects']} / "
                      + (f"{'; '.join(f'{n}× {k}' for k, n in r['connection_errors'].items())}"
                         if r['connection_errors'] else "none")
                      + (f" (first error: {r['first_error']})" if r['first_error'] else "")},
            {"what": "frames acked / stored (distinct)", "value": f"{r['acked_frames']:,} / {r['stored_frames']:,} "
                                                                 f"({r['stored_distinct']:,})"},
            {"what": "**acked not stored**", "value": f"**{r['acked_not_stored']}**"},
            {"what": "capture→stored p50 / p90 / p99", "value": f"{ms(lat['p50'])} / {ms(lat['p90'])} / "
                                                                f"{ms(lat['p99'])}"},
            {"what": "capture→ACK p50 / p99 (at the camera)", "value": f"{ms(r['ack_ms']['p50'], False)} / "
                                                                       f"{ms(r['ack_ms']['p99'], False)}"},
            {"what": "server CPU per acked frame (gateways + workers + nats-server + PostgreSQL)",
             "value": f"{r['server_cpu_us_per_acked_frame']:.0f} µs"},
            {"what": "drain after the load (until every acked frame was stored; checked every 2-6 s)",
             "value": "–" if r["drain_s"] is None else f"{r['drain_s']:.0f} s"},
            {"what": "frames at the 32.767 s latency cap", "value": "–" if lat["share_at_cap"] is None
             else f"{100 * lat['share_at_cap']:.1f} %"}]
    cores = [{"what": k, "value": f"{v:.2f}"} for k, v in sorted(r["cores_mean_in_window"].items(),
                                                                  key=lambda kv: -kv[1])]
    cores.append({"what": "whole machine", "value": f"{r['machine_cores_mean_in_window'] or 0:.2f}"})
    return (f"# {c['cameras']:,} one-fps cameras through the scale-out cluster for {c['seconds']:.0f} s"
            + (" (MQTT ingress)" if c.get("ingress") == "mqtt" else "") + "\n\n"
            f"{machine_line(r['machine'])}; {r['time']}; bundle {r['bundle']}, mean payload "
            f"{r['payload_bytes_mean']:.1f} B; {c['gateways']} gateway(s), {c['workers']} worker(s), 3 nats-server "
            f"nodes (JetStream R3), PostgreSQL, and the load generator ({c['load_processes']} processes, "
            + ("one WebSocket per camera" if c.get("ingress", "websocket") == "websocket" else
               "MQTT QoS 1 through nats-server's MQTT listeners, one connection per load process, HELLO || BATCH "
               "per message")
            + f", one frame per message) all on this machine; load average up to "
            f"{r['load_avg_max']:.1f}. Capture time = the time the frame was due, so a camera's queue counts as "
            f"latency.\n\n" + markdown_table(rows, [("what", ""), ("value", "")], {}) + "\n\n"
            "CPU in cores (mean over the window, user + system, from the kernel via psutil):\n\n"
            + markdown_table(cores, [("what", "process group"), ("value", "cores")], {}) + "\n\n"
            f"**Limited by:** {r['limited_by']}\n")


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["series"]
    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    t = s["sample_t"]
    rate = [(b - a) / max(tb - ta, 1e-9) for a, b, ta, tb in zip(s["stored_total"], s["stored_total"][1:], t, t[1:])]
    n = int(max(t)) + 1 if t else 0
    a1.plot(range(min(n, len(s["sent_per_s"]))), s["sent_per_s"][:n], lw=0.8, label="sent by cameras")
    a1.plot(range(min(n, len(s["acked_per_s"]))), s["acked_per_s"][:n], lw=0.8, label="acked (JetStream R3)")
    a1.plot(t[1:], rate, lw=1.2, label="stored (PostgreSQL)")
    a1.axhline(r["offered_frames_per_s"], color="gray", ls="--", lw=0.8, label="offered")
    a1.set_ylabel("frames/s")
    a1.legend(fontsize=8)
    pcs = s["per_capture_second"]
    a2.semilogy([p["s"] for p in pcs], [max(p["p99_ms"], 1) for p in pcs], lw=1, label="capture→stored p99")
    a2.semilogy([p["s"] for p in pcs], [max(p["p50_ms"], 1) for p in pcs], lw=1, label="capture→stored p50")
    aps = s.get("ack_per_capture_second", [])
    a2.semilogy([p["s"] for p in aps], [max(p["p99_ms"], 1) for p in aps], lw=0.8, ls=":", label="capture→ACK p99")
    a2.axhline(1000, color="red", ls="--", lw=0.8, label="1 s goal")
    a2.set_ylabel("latency ms\n(by capture second)")
    a2.legend(fontsize=8)
    names = list(s["cores"][0]) if s["cores"] else []
    a3.stackplot(t, *[[c[k] for c in s["cores"]] for k in names], labels=names)
    a3.set_ylabel("CPU cores")
    a3.set_xlabel("seconds since the window started")
    a3.legend(fontsize=7, loc="lower left", ncol=3, framealpha=0.9)
    a1.set_title(f"{r['config']['cameras']:,} one-fps cameras, "
                 + ("MQTT ingress" if r["config"].get("ingress") == "mqtt" else f"{r['config']['gateways']} gateway(s)")
                 + f", "
                 f"{r['config']['workers']} worker(s): throughput, latency, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command(
    bundle: Optional[str] = typer.Option(None, "--bundle", "-b", help="Model bundle (default: the embedded one)."),
    cameras: int = typer.Option(10_000, "--cameras", min=1, help="Simulated one-fps cameras."),
    seconds: float = typer.Option(300.0, "--seconds", min=5.0, help="Load window."),
    gateways: int = typer.Option(2, "--gateways", min=1),
    workers: int = typer.Option(2, "--workers", min=1),
    load_procs: int = typer.Option(4, "--load-procs", min=1, help="Load-generator processes."),
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for NAME.{json,md,png}."),
    name: str = typer.Option("cluster_10k", "--name", help="Result file stem."),
    mqtt: bool = typer.Option(False, "--mqtt", help="Cameras publish over MQTT (nats-server's listener, QoS 1) "
                                                    "instead of WebSockets to gateways; one connection per process."),
) -> None:
    """Many one-fps cameras through the local scale-out cluster for minutes: offered vs stored frames/s, p50/p99
    capture→stored, acked-not-stored, CPU per process group, what saturated (NAME.{json,md,png})."""
    run(bundle, cameras, seconds, gateways, workers, load_procs, out, name, log=typer.echo, mqtt=mqtt)


if __name__ == "__main__":
    typer.run(command)
