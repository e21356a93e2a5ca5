"""`taskcodec cameras add/list/remove` and `serve` flag errors, through the real typer app on a real SQLite file."""

import sqlite3

from typer.testing import CliRunner

from taskcodec.server.__main__ import app
from taskcodec.server.auth import authenticate, hash_token, verify_token
from taskcodec.server.storage import SQLiteStorage
from tiny_bundle import make_tiny_bundle

runner = CliRunner()


def test_cameras_add_list_remove(tmp_path):
    db = tmp_path / "cams.db"
    out = runner.invoke(app, ["cameras", "add", "cam-1", "--db", str(db)])
    assert out.exit_code == 0, out.output
    token = out.stdout.strip().splitlines()[0]
    assert len(token) >= 40
    with sqlite3.connect(db) as conn:
        (stored,) = conn.execute("SELECT token_hash FROM cameras WHERE id='cam-1'").fetchone()
    assert token not in stored and stored.startswith("sha256$")  # only a salted hash is kept
    storage = SQLiteStorage(db)
    assert authenticate(storage, "cam-1", token.encode())
    assert not authenticate(storage, "cam-1", token.encode()[:-1])
    assert not authenticate(storage, "cam-2", token.encode())
    second = runner.invoke(app, ["cameras", "add", "cam-2", "--db", str(db)]).stdout.strip().splitlines()[0]
    assert second != token
    dup = runner.invoke(app, ["cameras", "add", "cam-1", "--db", str(db)])
    assert dup.exit_code == 2 and "already exists" in dup.output
    bad = runner.invoke(app, ["cameras", "add", "bad id!", "--db", str(db)])
    assert bad.exit_code == 2 and "camera id" in bad.output
    listed = runner.invoke(app, ["cameras", "list", "--db", str(db)])
    assert listed.exit_code == 0 and "cam-1" in listed.stdout and "cam-2" in listed.stdout
    assert token not in listed.stdout
    assert runner.invoke(app, ["cameras", "remove", "cam-1", "--db", str(db)]).exit_code == 0
    assert not authenticate(storage, "cam-1", token.encode())
    gone = runner.invoke(app, ["cameras", "remove", "cam-1", "--db", str(db)])
    assert gone.exit_code == 2 and "no camera" in gone.output
    storage.close()


def test_same_token_hashes_differently_per_salt():
    a, b = hash_token(b"tok"), hash_token(b"tok")
    assert a != b and verify_token(b"tok", a) and verify_token(b"tok", b)
    assert not verify_token(b"tok", "garbage") and not verify_token(b"tok", "md5$00$00")


def test_serve_reports_bad_inputs_clearly(tmp_path):
    missing = runner.invoke(app, ["serve", "--bundle", str(tmp_path / "nope"), "--db", str(tmp_path / "x.db")])
    assert missing.exit_code == 2 and "not a taskcodec bundle" in missing.output
    make_tiny_bundle(tmp_path / "b")
    no_dir = runner.invoke(app, ["serve", "--bundle", str(tmp_path / "b"), "--db", str(tmp_path / "no" / "x.db")])
    assert no_dir.exit_code == 2 and "does not exist" in no_dir.output
    bad_flag = runner.invoke(app, ["serve", "--workers", "0"])
    assert bad_flag.exit_code == 2
    no_db_dir = runner.invoke(app, ["cameras", "list", "--db", str(tmp_path / "no" / "x.db")])
    assert no_db_dir.exit_code == 2 and "does not exist" in no_db_dir.output
