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


def _private_ca(folder):
    """A CA made here, and a server certificate it signs for 127.0.0.1 / localhost (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "taskcodec test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(cert.public_bytes(pem))
    password = b"correct horse"
    (folder / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(password)))
    (folder / "server.key").chmod(0o600)
    return folder / "ca.pem", folder / "server.pem", folder / "server.key", password.decode()


def test_tls_round_trip_with_a_private_ca(tmp_path, monkeypatch):
    import ssl

    from taskcodec import wire
    from taskcodec.coding import RangeCoder, compress
    import numpy as np

    bundle = make_tiny_bundle(tmp_path / "bundle")
    ca, cert, key, password = _private_ca(tmp_path)
    secret = tmp_path / "key-password"
    secret.write_text(password)
    secret.chmod(0o600)
    cfg = tmp_path / "server.yaml"
    cfg.write_text(f"tls:\n  cert: {cert}\n  key: {key}\n  key_password_file: {secret}\n")
    with ServerProcess(bundle.path, tmp_path / "frames.db", "--config", str(cfg), tls_ca=ca) as srv:
        assert srv.url.startswith("https://") and srv.health()["status"] == "ok"
        token = srv.add_camera("cam-tls")
        coder = RangeCoder(bundle.tables)
        sym = np.zeros((3, bundle.latent_dim), np.int32)
        frames = [wire.Frame(i, 1_700_000_000_000 + i, compress(s, coder, bundle.model_tag)) for i, s in enumerate(sym)]
        with srv.stream() as c:  # wss:// verified against the private CA
            assert c.ws.socket.version().startswith("TLS")
            assert c.hello(wire.Hello(bundle.model_tag, "cam-tls", token)) == wire.Welcome()
            assert c.send(wire.Batch(9, frames)) == [wire.Ack(9, 0, 3)]
        with srv.http() as h:  # https:// ingest too
            r = h.post(wire.Hello(bundle.model_tag, "cam-tls", token), wire.Batch(9, frames))
            assert r.status == 200 and r.replies == [wire.Ack(9, 0, 3)]
        assert [f["seq"] for f in srv.get_json("/v1/cameras/cam-tls/frames")["frames"]] == [0, 1, 2]
        # the camera runtime over wss://, trusting the private CA through OpenSSL's SSL_CERT_FILE
        from taskcodec.runtime.capture import CaptureConfig, run_capture

        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        rt_token = srv.add_camera("cam-rt").decode()
        report = run_capture(CaptureConfig(
            device="virtual://fashion-mnist?seed=1", bundle=str(bundle.path), server=srv.url, camera_id="cam-rt",
            token=rt_token, spool=str(tmp_path / "spool"), frames=8, quiet=True, drain_timeout=60, threads=1))
        assert report.acked == 8
        assert len(srv.get_json("/v1/cameras/cam-rt/frames")["frames"]) == 8
        monkeypatch.delenv("SSL_CERT_FILE")
        # a client that does not trust the CA is refused; plain ws:// on the TLS port does not work
        from taskcodec.server.client import StreamClient

        with pytest.raises(ssl.SSLError):
            StreamClient(srv.url, 10, ssl_context=ssl.create_default_context())
        with pytest.raises(Exception):
            StreamClient(srv.url.replace("https://", "http://"), 10)
    assert password not in (tmp_path / "server.yaml").read_text()


def test_config_file_refuses_unknown_and_mistyped_keys_by_name(tmp_path):
    make_tiny_bundle(tmp_path / "b")
    runner = CliRunner()
    cases = [("limits:\n  max_hello_byte: 512\n", "limits.max_hello_byte: unknown key"),
             ("port: eighty\n", "port:"),
             ("storage:\n  checkpoint_interval_s: -1\n", "storage.checkpoint_interval_s"),
             ("tls:\n  cert: /nonexistent.pem\n  key: /nonexistent.key\n", "tls.cert: no file"),
             ("- a list\n", "expected a mapping")]
    for text, expected in cases:
        cfg = tmp_path / "server.yaml"
        cfg.write_text(text)
        out = runner.invoke(cli, ["serve", "--config", str(cfg), "--bundle", str(tmp_path / "b"),
                                  "--db", str(tmp_path / "x.db")])
        assert out.exit_code == 2 and expected in out.output, (text, out.output)
    out = runner.invoke(cli, ["serve", "--tls-cert", str(tmp_path / "c.pem")])
    assert out.exit_code == 2 and "go together" in out.output
    from taskcodec.server.config import build_config

    cfg = tmp_path / "server.yaml"
    cfg.write_text("port: 9000\nlimits:\n  max_pending: 8\n")
    config = build_config(cfg, {"port": 9100, "host": None})
    assert config.port == 9100 and config.limits.max_pending == 8 and config.host == "127.0.0.1"


# Routes anyone may call: health for load balancers, the cameras' own ingest (they authenticate in the HELLO), and
# the dashboard's login page, logout, static assets and the redirect of / to it.
PUBLIC = {("GET", "/healthz"), ("POST", "/v1/ingest"), ("WS", "/v1/stream"), ("GET", "/dashboard/login"),
          ("POST", "/dashboard/login"), ("POST", "/dashboard/logout"), ("MOUNT", "/dashboard/static"),
          ("GET", "/")}  # / only redirects to /dashboard/


def _all_routes(app):
    """(method, path) of every route of the app, included routers and mounts too (so routes added later by other
    modules are checked without editing this test)."""
    def walk(routes, prefix=""):
        for r in routes:
            if hasattr(r, "original_router"):  # FastAPI's included router
                yield from walk(r.original_router.routes, prefix + r.include_context.prefix)
            elif hasattr(r, "methods") and r.methods:
                for m in sorted(r.methods - {"HEAD"}):
                    yield m, prefix + r.path
            elif type(r).__name__.endswith("WebSocketRoute"):
                yield "WS", prefix + r.path
            else:
                yield "MOUNT", prefix + r.path
    return sorted(set(walk(app.routes)))


def test_no_route_answers_without_credentials(srv, tmp_path):
    """Every route of the real app but the PUBLIC ones refuses a request without a key (401/403, or a redirect to the
    dashboard's login page) and lets an admin key through."""
    import re

    from taskcodec.server.app import create_app

    routes = _all_routes(create_app(srv.bundle_path, tmp_path / "routes.db"))
    checked = []
    admin = srv.add_operator("op-routes", "admin")
    camera_token = srv.add_camera("x").decode()  # camera-facing routes (a camera's own token) use camera "x"
    opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                              {"redirect_request": lambda *a, **k: None}))

    def call(method, url, key):
        headers = {"Authorization": f"Bearer {key}", "X-Camera-Id": "x"} if key else {}
        req = urllib.request.Request(url, method=method, data=b"" if method in ("POST", "PUT") else None,
                                     headers=headers)
        try:
            with opener.open(req, timeout=30) as r:
                return r.status, r.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers

    for method, path in routes:
        if (method, path) in PUBLIC:
            continue
        assert method != "MOUNT", f"mounted app {path} is not in PUBLIC: say who may see it"
        url = srv.url + re.sub(r"\{[^}]+\}", "x", path)
        code, headers = call(method, url, None)
        where = headers.get("Location", "")
        # refused: 401/403, a redirect to the login page, or (a POST whose body FastAPI validates before the
        # route's own authentication runs) 422 -- nothing is done or shown either way
        assert code in (401, 403) or (code in (302, 303, 307) and "login" in where) or \
            (code == 422 and method in ("POST", "PUT")), (method, path, code)
        camera_route = "taskcodec-camera" in headers.get("WWW-Authenticate", "")
        if not path.startswith("/dashboard"):  # dashboard pages log in with a cookie (their own tests)
            code, _ = call(method, url, camera_token if camera_route else admin)
            assert code not in (401, 403), (method, path, code, "camera" if camera_route else "operator")
        checked.append((method, path))
    assert {("GET", "/v1/cameras"), ("GET", "/metrics"), ("GET", "/openapi.json")} <= set(checked), checked
