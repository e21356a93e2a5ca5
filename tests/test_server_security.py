"""Operator credentials on the real server subprocess: every read/admin endpoint refuses a request without a valid
API key of a sufficient scope and answers one with; /healthz stays open and says nothing secret."""

import json
import urllib.error
import urllib.request

import pytest
from typer.testing import CliRunner

from taskcodec.server.__main__ import app as cli
from taskcodec.testing import ServerProcess
from tiny_bundle import make_tiny_bundle

# (path, the smallest scope that may read it)
PROTECTED = [("/v1/cameras", "read"), ("/v1/cameras/cam-a/frames", "read"), ("/metrics", "metrics"),
             ("/openapi.json", "read")]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    bundle = make_tiny_bundle(root / "bundle")
    with ServerProcess(bundle.path, root / "frames.db") as server:
        server.add_camera("cam-a")
        yield server


def _status(srv, path, key=None, header=None):
    req = srv.request(path, key)
    if header is not None:
        req.add_header("Authorization", header)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_every_read_endpoint_needs_a_key_of_enough_scope(srv):
    keys = {scope: srv.add_operator(f"op-{scope}", scope) for scope in ("metrics", "read", "admin")}
    for path, needed in PROTECTED:
        assert _status(srv, path, None)[0] == 401, path
        assert _status(srv, path, None, header="Bearer tco_not-a-real-key")[0] == 401, path
        assert _status(srv, path, None, header=f"Basic {keys['admin']}")[0] == 401, path
        for scope, key in keys.items():
            code, body = _status(srv, path, key)
            allowed = ("metrics", "read", "admin").index(scope) >= ("metrics", "read", "admin").index(needed)
            assert code == (200 if allowed else 403), (path, scope, code, body[:200])
    for path in ("/docs", "/redoc"):
        assert _status(srv, path, keys["admin"])[0] == 404  # no docs UI: it could not send a key anyway
    assert "operator authentication failed" in srv.log()


def test_healthz_is_open_and_says_nothing_secret(srv):
    code, body = _status(srv, "/healthz", None)
    health = json.loads(body)
    assert code == 200 and health["status"] == "ok"
    assert not {"pid", "version", "db", "path"} & set(health)


def test_operators_cli_prints_key_once_and_stores_only_a_hash(tmp_path):
    import sqlite3

    runner = CliRunner()
    db = tmp_path / "ops.db"
    out = runner.invoke(cli, ["operators", "add", "alice", "--scope", "read", "--db", str(db)])
    assert out.exit_code == 0, out.output
    key = out.stdout.strip().splitlines()[0]
    assert key.startswith("tco_") and len(key) > 40
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT key_hash, scope FROM operators").fetchall()
    assert stored[0][1] == "read" and key not in stored[0][0]
    assert runner.invoke(cli, ["operators", "add", "bob", "--scope", "root", "--db", str(db)]).exit_code == 2
    listed = runner.invoke(cli, ["operators", "list", "--db", str(db)])
    assert "alice\tread" in listed.stdout and key not in listed.stdout
    assert runner.invoke(cli, ["operators", "remove", "alice", "--db", str(db)]).exit_code == 0
    assert runner.invoke(cli, ["operators", "remove", "alice", "--db", str(db)]).exit_code == 2
