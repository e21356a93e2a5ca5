"""The query API on a real server subprocess: time ranges, camera/class filters, cursor paging, counts by class per
interval, CSV = JSON, unknown parameters refused by name, operator auth; every query shape answered from an index;
per-camera metrics identical from every process of a `--workers 2` server and equal to the database."""

import csv
import io
import json
import re
import sqlite3
import time
import urllib.error
import urllib.parse
from collections import Counter

import numpy as np
import pytest

from taskcodec import wire
from taskcodec.coding import RangeCoder, compress
from taskcodec.server.query import CountQuery, FrameQuery, Reader, counts_sql, frames_sql
from taskcodec.server.query import iso as query_iso
from taskcodec.testing import ServerProcess
from tiny_bundle import make_tiny_bundle

T0 = 1_790_000_000_000  # ms, capture clock of the synthetic cameras
CAMS = ("cam-a", "cam-b", "cam-c")
N = 120  # frames per camera, one every 10 s of capture time


def _ingest(srv, bundle, tokens, seed=0):
    coder = RangeCoder(bundle.tables)
    rng = np.random.default_rng(seed)
    for k, cam in enumerate(CAMS):
        symbols = rng.integers(-6, 7, (N, bundle.latent_dim)).astype(np.int32)
        frames = [wire.Frame(i, T0 + 10_000 * i + 1000 * k, compress(s, coder, bundle.model_tag))
                  for i, s in enumerate(symbols)]
        with srv.stream() as c:
            assert c.hello(wire.Hello(bundle.model_tag, cam, tokens[cam])) == wire.Welcome()
            for j in range(0, N, 40):
                assert c.send(wire.Batch(1, frames[j:j + 40])) == [wire.Ack(1, j, 40)]


def _db_rows(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT camera_id, epoch, seq, ts_capture_ms, model_id, prediction, confidence, "
                            "length(payload) FROM frames").fetchall()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("query")
    bundle = make_tiny_bundle(root / "bundle")
    db = root / "frames.db"
    with ServerProcess(bundle.path, db) as srv:
        tokens = {cam: srv.add_camera(cam) for cam in CAMS}
        _ingest(srv, bundle, tokens)
        yield srv, bundle, db


def _get(srv, path, **params):
    return srv.get_json(path + "?" + urllib.parse.urlencode(params, doseq=True))


def _status(srv, path, key="default"):
    try:
        with urllib.request.urlopen(srv.request(path, key), timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_time_range_camera_and_class_filters_match_the_database(env):
    srv, bundle, db = env
    rows = _db_rows(db)
    assert len(rows) == N * len(CAMS)
    classes = list(bundle.classes)
    since, until = T0 + 200_000, T0 + 900_000
    common = Counter(r[5] for r in rows).most_common(2)
    wanted = {classes[p] for p, _ in common}
    got = _get(srv, "/v1/query/frames", camera=["cam-a", "cam-c"], class_name=sorted(wanted), since=since,
               until=until, limit=10000)
    expect = sorted((r[0], r[2]) for r in rows if r[0] in ("cam-a", "cam-c") and since <= r[3] < until
                    and classes[r[5]] in wanted)
    assert expect and sorted((f["camera_id"], f["seq"]) for f in got["frames"]) == expect
    assert got["count"] == len(expect) and got["next_cursor"] is None
    f = got["frames"][0]
    db_row = next(r for r in rows if (r[0], r[2]) == (f["camera_id"], f["seq"]))
    assert (f["ts_capture_ms"], f["model_id"], f["prediction"], f["payload_bytes"]) == \
        (db_row[3], db_row[4], db_row[5], db_row[7])
    assert f["class_name"] == classes[db_row[5]] and f["confidence"] == pytest.approx(db_row[6])
    # capture times ascending; ISO 8601 bounds give the same answer as milliseconds
    ts = [f["ts_capture_ms"] for f in got["frames"]]
    assert ts == sorted(ts)
    iso = _get(srv, "/v1/query/frames", camera=["cam-a", "cam-c"], class_name=sorted(wanted), limit=10000,
               since=query_iso(since), until=query_iso(until))
    assert [(f["camera_id"], f["seq"]) for f in iso["frames"]] == [(f["camera_id"], f["seq"]) for f in got["frames"]]
    # min_confidence and the newest-first order
    top = _get(srv, "/v1/query/frames", camera="cam-b", order="desc", limit=5, min_confidence=0.3)
    expect_b = sorted((r for r in rows if r[0] == "cam-b" and r[6] >= 0.3), key=lambda r: -r[3])[:5]
    assert [f["seq"] for f in top["frames"]] == [r[2] for r in expect_b]


def test_cursor_pages_through_everything_once(env):
    srv, _, db = env
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 50, **({"cursor": cursor} if cursor else {})}
        page = _get(srv, "/v1/query/frames", **params)
        seen += [(f["camera_id"], f["epoch"], f["seq"]) for f in page["frames"]]
        pages += 1
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert pages >= len(CAMS) * N // 50 and len(seen) == len(set(seen))
    assert set(seen) == {(r[0], r[1], r[2]) for r in _db_rows(db)}


def test_counts_by_class_per_interval_match_the_database(env):
    srv, bundle, db = env
    rows, classes = _db_rows(db), list(bundle.classes)
    got = _get(srv, "/v1/query/counts", interval="5m", by_camera="true", since=T0, until=T0 + 1_000_000)
    assert got["interval_ms"] == 300_000
    expect = Counter(((r[3] // 300_000) * 300_000, r[0], classes[r[5]]) for r in rows if T0 <= r[3] < T0 + 1_000_000)
    flat = Counter({(b["start_ms"], b["camera_id"], name): n for b in got["buckets"] for name, n in b["counts"].items()})
    assert flat == expect
    assert all(b["total"] == sum(b["counts"].values()) for b in got["buckets"])
    # all cameras together, one class; CSV says the same as JSON
    name = classes[rows[0][5]]
    together = _get(srv, "/v1/query/counts", interval="1h", class_name=name)
    assert sum(b["total"] for b in together["buckets"]) == sum(1 for r in rows if classes[r[5]] == name)
    text = srv.get_text("/v1/query/counts?interval=1h&format=csv&class_name=" + urllib.parse.quote(name))
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert [(int(p["start_ms"]), p["class_name"], int(p["count"])) for p in parsed] == \
        [(b["start_ms"], name, b["counts"][name]) for b in together["buckets"]]


def test_csv_export_equals_json(env):
    srv, _, _ = env
    js = _get(srv, "/v1/query/frames", camera="cam-b", limit=1000)["frames"]
    text = srv.get_text("/v1/query/frames?camera=cam-b&limit=1000&format=csv")
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == len(js) == N
    for p, j in zip(parsed, js):
        assert {k: str(v) for k, v in j.items()} == p


def test_unknown_parameters_are_refused_by_name(env):
    srv, _, _ = env
    for path, name in (("/v1/query/frames?until_ts=5", "until_ts"), ("/v1/query/frames?clas_name=x", "clas_name"),
                       ("/v1/query/counts?interval=1h&bucket=5", "bucket"),
                       ("/v1/cameras/cam-a/frames?until_ts=5", "until_ts"),
                       ("/v1/cameras/cam-a/frames?class_name=x&limit=3", "class_name")):
        status, body = _status(srv, path)
        assert status == 422, (path, body)
        assert [d["loc"] for d in json.loads(body)["detail"]] == [["query", name]], body
    status, body = _status(srv, "/v1/query/frames?class_name=no-such-class")
    assert status == 422 and "no-such-class" in body
    status, body = _status(srv, "/v1/query/counts?interval=0")
    assert status == 422 and "interval" in body
    assert _status(srv, "/v1/cameras/cam-a/frames?limit=3")[0] == 200  # declared parameters still work


def test_queries_need_an_operator_key(env):
    srv, _, _ = env
    assert _status(srv, "/v1/query/frames", key=None)[0] == 401
    assert _status(srv, "/v1/query/counts", key="tco_wrong")[0] == 401
    metrics_only = srv.add_operator("scraper-q", "metrics")
    assert _status(srv, "/v1/query/frames", key=metrics_only)[0] == 403


def test_every_query_shape_uses_an_index(env):
    srv, bundle, db = env
    reader = Reader(db, bundle.classes)
    shapes = [FrameQuery(), FrameQuery(camera=["cam-a"], since="1", until="2"), FrameQuery(camera=["cam-a", "cam-b"]),
              FrameQuery(class_name=[bundle.classes[0]], since="1"), FrameQuery(order="desc", min_confidence=0.5),
              FrameQuery(camera=["cam-a"], order="desc", class_name=[bundle.classes[1]])]
    plans = [frames_sql(q, reader) for q in shapes]
    plans += [counts_sql(CountQuery(**kw), reader, 60_000) for kw in
              ({}, {"by_camera": True, "since": "5"}, {"camera": ["cam-a"]}, {"class_name": [bundle.classes[2]]})]
    with sqlite3.connect(db) as conn:
        for sql, args in plans:
            plan = [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
            table = [p for p in plan if re.search(r"\b(SCAN|SEARCH) frames\b", p)]
            assert table and all("INDEX" in p for p in table), (sql, plan)  # never a scan of the table itself
            if sql.startswith("SELECT camera_id"):  # listings come in index order, not sorted afterwards ...
                sorted_after = any("TEMP B-TREE FOR ORDER BY" in p for p in plan)
                # ... except named cameras' rows, found through the primary key (schema step 7: one per-camera index)
                # and sorted: only their recent rows, which compaction bounds
                assert not sorted_after or ("camera_id IN" in sql and all(
                    "sqlite_autoindex_frames_1 (camera_id=?" in p for p in table)), (sql, plan)


def test_fleet_figures_read_only_the_new_rows(env):
    from taskcodec.server.query import BOUNDS_SQL, NEW_ROWS_SQL, RECENT_SQL, ROW_AT_SQL

    _, _, db = env
    with sqlite3.connect(db) as conn:
        for sql in (NEW_ROWS_SQL, RECENT_SQL, ROW_AT_SQL, BOUNDS_SQL):
            plan = [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, [1] * sql.count("?"))]
            assert not any(p.startswith("SCAN frames") for p in plan), (sql, plan)  # rowid searches only
            assert any(p.startswith("SEARCH frames") for p in plan), (sql, plan)


def _metric(text, name, camera):
    m = re.search(rf'^{name}{{camera="{re.escape(camera)}"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_per_camera_metrics_agree_across_two_workers(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    db = tmp_path / "frames.db"
    with ServerProcess(bundle.path, db, "--workers", "2") as srv:
        tokens = {cam: srv.add_camera(cam) for cam in CAMS}
        _ingest(srv, bundle, tokens, seed=3)
        rows = _db_rows(db)
        answers, local = [], set()
        for _ in range(60):  # each scrape is a new connection, accepted by either worker
            with urllib.request.urlopen(srv.request("/metrics"), timeout=30) as r:
                text = r.read().decode()
            answers.append(text)
            # this counter is per process: two different values prove both workers answered
            local.add(re.search(r"^taskcodec_server_frames_stored_total ([0-9.e+]+)$", text, re.M).group(1))
            if len(local) > 1 and len(answers) >= 8:
                break
        assert len(local) > 1, "every scrape reached the same worker"
        for text in answers:
            for cam in CAMS:
                mine = [r for r in rows if r[0] == cam]
                assert _metric(text, "taskcodec_server_camera_frames_stored_total", cam) == len(mine)
                assert _metric(text, "taskcodec_server_camera_payload_bytes_total", cam) == sum(r[7] for r in mine)
                assert _metric(text, "taskcodec_server_camera_online", cam) == 1.0
                assert f'taskcodec_server_camera_model_info{{camera="{cam}",model_id="{bundle.model_id}"}} 1.0' in text
                assert _metric(text, "taskcodec_server_camera_uplink_payload_bytes_per_second", cam) == \
                    pytest.approx(sum(r[7] for r in mine) / 60.0)
        assert "taskcodec_server_camera_last_seen_timestamp_seconds" in answers[0]


def test_refusals_and_disconnects_are_logged_with_camera_model_and_reason(tmp_path):
    bundle = make_tiny_bundle(tmp_path / "bundle")
    with ServerProcess(bundle.path, tmp_path / "frames.db", "--log-level", "info") as srv:
        token = srv.add_camera("cam-log")
        tag = bundle.model_tag.hex()
        with srv.stream() as c:  # wrong token
            assert isinstance(c.hello(wire.Hello(bundle.model_tag, "cam-log", b"wrong")), wire.Error)
        with srv.stream() as c:  # a model the server does not accept
            assert isinstance(c.hello(wire.Hello(b"\x01" * 8, "cam-log", token)), wire.Error)
        with srv.stream() as c:  # authenticated, then a malformed message
            assert c.hello(wire.Hello(bundle.model_tag, "cam-log", token)) == wire.Welcome()
            assert isinstance(c.send_raw(b"\xff\x00garbage")[0], wire.Error)
        with srv.stream() as c:  # a frame whose payload does not decode is rejected (the others stored)
            assert c.hello(wire.Hello(bundle.model_tag, "cam-log", token)) == wire.Welcome()
            good = compress(np.zeros(bundle.latent_dim, np.int32), RangeCoder(bundle.tables), bundle.model_tag)
            replies = c.send(wire.Batch(9, [wire.Frame(0, T0, good), wire.Frame(1, T0 + 1, b"\x00\x01junk")]))
            assert any(isinstance(r, wire.Reject) for r in replies)
        with srv.stream() as c:  # a normal session, closed by the camera
            assert c.hello(wire.Hello(bundle.model_tag, "cam-log", token)) == wire.Welcome()

        def lines(event):
            text = srv.log_path.read_text(errors="replace")  # the whole log (srv.log() is its tail)
            return [line for line in text.splitlines() if f"event={event} " in line]

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(lines("disconnect")) < 4:
            time.sleep(0.1)
        refused, gone, srv_log_rejected = lines("refused"), lines("disconnect"), lines("rejected")
    assert any("camera=cam-log" in r and f"model={tag}" in r and "code=unauthorized" in r and "reason=" in r
               for r in refused), refused
    assert any("camera=cam-log" in r and "model=0101010101010101" in r and "code=unknown_model" in r
               and f"server expects model {bundle.model_id}" in r for r in refused), refused
    assert any("camera=cam-log" in r and "code=bad_message" in r and "malformed" in r for r in refused), refused
    # 4 of the 5 sessions: disconnects before authentication are rate-limited per address (one per 10 s), so the
    # unknown-model one right after the wrong-token one is folded into a count; its refusal line is above
    assert len(gone) == 4 and all("camera=cam-log" in g and "model=" in g and "reason=" in g for g in gone), gone
    assert sum("reason=\"normal close\"" in g for g in gone) == 2, gone
    assert any("closed_by=server" in g and "wrong token" in g for g in gone), gone
    assert any("closed_by=server" in g and "malformed" in g for g in gone), gone
    assert any("camera=cam-log" in r and f"model={bundle.model_id}" in r and "code=bad_payload" in r and
               "frames=1" in r for r in srv_log_rejected), srv_log_rejected


def test_a_database_from_before_the_query_api_gets_the_index_on_open(tmp_path):
    from taskcodec.server.storage import MIGRATIONS, SQLiteStorage

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # the original schema, no frames_by_time, user_version 0
        conn.executescript(MIGRATIONS[0])
        conn.execute("INSERT INTO frames VALUES ('cam-x', 1, 0, 5, 6, 'm', x'00', 1, 0.5)")
    SQLiteStorage(db).close()
    with sqlite3.connect(db) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "frames_by_time" in names
        plan = [r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + frames_sql(FrameQuery(), Reader(db))[0],
                                            [1000])]
        assert any("frames_by_time" in p for p in plan), plan


def test_counts_read_from_the_insert_time_counters_match_the_database(env):
    """All-camera counts per minute and per hour, and per camera per hour, with range ends inside a minute (frames on
    both sides: counted from the rows) and after the newest frame (answered from the counters' time bounds), equal
    a count of the stored rows; the counter tables were written by the server's own ingest (storage_counters)."""
    srv, bundle, db = env
    rows, classes = _db_rows(db), list(bundle.classes)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT sum(frames) FROM fleet_counts WHERE unit_ms = 60000").fetchone()[0] == len(rows)
        assert conn.execute("SELECT sum(frames) FROM frame_rollup").fetchone()[0] == len(rows)
    end = max(r[3] for r in rows) + 1
    for interval, ms, by_camera, since, until in (("1m", 60_000, False, T0 + 123_456, T0 + 987_654),
                                                  ("1m", 60_000, False, T0 - 1, end),
                                                  ("1h", 3_600_000, False, T0 + 61_001, end),
                                                  ("5m", 300_000, False, None, None),
                                                  ("1h", 3_600_000, True, T0 + 7_777, end)):
        params = {k: v for k, v in (("since", since), ("until", until)) if v is not None}
        got = _get(srv, "/v1/query/counts", interval=interval, by_camera=str(by_camera).lower(), **params)
        expect = Counter(((r[3] // ms) * ms, r[0] if by_camera else None, classes[r[5]]) for r in rows
                         if (since is None or r[3] >= since) and (until is None or r[3] < until))
        flat = Counter({(b["start_ms"], b.get("camera_id"), name): n for b in got["buckets"]
                        for name, n in b["counts"].items()})
        assert flat == expect, (interval, by_camera, since, until)
