"""The deployment files hold up: the systemd units pass `systemd-analyze verify` with no warning, their ExecStart
command lines parse with the real CLIs and, with the example configurations, build the real typed configurations
(runtime CaptureConfig, server ServerConfig, EventsConfig); a misspelt key in an example is refused by name; the
Containerfile copies only tracked files and its command line parses with the real `taskcodec serve`."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
EXAMPLES = DEPLOY / "examples"
UNITS = {"server": DEPLOY / "systemd" / "taskcodec-server.service",
         "runtime": DEPLOY / "systemd" / "taskcodec-runtime@.service"}
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections, current = {}, None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _exec_args(path: Path, instance: str | None = None) -> list[str]:
    (command,) = _unit(path)["Service"]["ExecStart"]
    if instance is not None:
        command = command.replace("%i", instance)
    return shlex.split(command)


def _click(typer_app: typer.Typer, args: list[str]):
    """Parse ``args`` with the real command's click parser (no command runs); returns the subcommand's context."""
    group = typer.main.get_command(typer_app)
    cmd = group.commands[args[0]]
    return cmd.make_context(args[0], list(args[1:]))


def _runtime_config(args: list[str]):
    from taskcodec.runtime.cli import app, build_config

    params = _click(app, args[1:]).params  # args[0] is the runtime executable
    config = params.pop("config")
    flags = {k: v for k, v in params.items() if k not in ("profile", "report", "verbose")}
    return build_config(flags, config)


def _server_app() -> typer.Typer:
    from taskcodec.server.cli import register

    app = typer.Typer()
    register(app)
    return app


def _server_config(args: list[str]):
    from taskcodec.server.config import build_config

    p = _click(_server_app(), args).params
    overrides = {"bundle": p["bundle"], "db": p["db"], "host": p["host"], "port": p["port"], "workers": p["workers"],
                 "log_level": p["log_level"], "microbatch": p["microbatch"]}
    return build_config(p["config_file"], overrides)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)")
@pytest.mark.parametrize("kind", sorted(UNITS))
def test_systemd_units_verify_without_warnings(kind, tmp_path):
    unit = UNITS[kind]
    # verify checks that ExecStart's program exists: point it at this installation's entry point
    exe = shutil.which("taskcodec" if kind == "server" else "runtime")
    assert exe, "taskcodec is not installed with its entry points (pip install -e .)"
    text = re.sub(r"/opt/taskcodec/venv/bin/(taskcodec|runtime)", exe, unit.read_text())
    name = unit.name.replace("@.service", "@front-door.service")
    (tmp_path / unit.name).write_text(text)
    if name != unit.name:
        (tmp_path / name).write_text(text)
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", str(tmp_path / name)], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, SYSTEMD_LOG_LEVEL="notice"))
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "", out.stderr  # an unknown key or a bad value is only a warning: refuse those too


def test_units_say_what_the_issue_asks():
    runtime, server = _unit(UNITS["runtime"])["Service"], _unit(UNITS["server"])["Service"]
    assert runtime["Restart"] == ["on-failure"] and server["Restart"] == ["on-failure"]
    assert runtime["RestartPreventExitStatus"] == ["2"]  # a bad config is not restarted forever
    assert _exec_args(UNITS["runtime"])[1] == "capture" and _exec_args(UNITS["server"])[1] == "serve"
    assert "video" in runtime["SupplementaryGroups"][0]


def test_runtime_unit_with_the_example_cameras_builds_each_camera_config(tmp_path):
    import yaml

    cameras = yaml.safe_load((EXAMPLES / "cameras.yaml").read_text())["cameras"]
    for cam in cameras:
        args = _exec_args(UNITS["runtime"], instance=cam)
        args[args.index("--config") + 1] = str(EXAMPLES / "cameras.yaml")
        cfg = _runtime_config(args)
        assert cfg.camera_id == cam and cfg.device == str(cameras[cam]["device"])
        assert cfg.spool == f"/var/lib/taskcodec/spool/{cam}" and cfg.token_file == cameras[cam]["token_file"]
        assert cfg.server == "https://ingest.example.net:8443" and cfg.precision == "int8"
    csi = _runtime_config(["runtime", "capture", "--config", str(EXAMPLES / "cameras.yaml"), "--camera-id", "dock-csi"])
    assert csi.device == "csi://0" and csi.size == (1280, 720)
    rpi = _runtime_config(["runtime", "capture", "--config", str(EXAMPLES / "camera-rpi.yaml")])
    assert rpi.camera_id == "garden" and rpi.device == "/dev/video0" and rpi.threads == 2
    # the loader is strict: a misspelt key in a copy of the example is refused by name
    bad = tmp_path / "cameras.yaml"
    bad.write_text((EXAMPLES / "cameras.yaml").read_text().replace("    fps: 5\n", "    fsp: 5\n"))
    with pytest.raises(typer.BadParameter, match="fsp"):
        _runtime_config(["runtime", "capture", "--config", str(bad), "--camera-id", "front-door"])


def test_server_unit_with_the_example_config_builds_the_server_config(tmp_path):
    args = _exec_args(UNITS["server"])
    args[args.index("--config") + 1] = str(EXAMPLES / "server.yaml")
    cfg = _server_config(args[1:])
    assert cfg.workers == 2 and cfg.port == 8000 and str(cfg.db) == "/var/lib/taskcodec/server.db"
    assert cfg.log_level == "info" and cfg.tls is None
    from taskcodec.server.config import ConfigError

    bad = tmp_path / "server.yaml"
    bad.write_text((EXAMPLES / "server.yaml").read_text().replace("workers: 2", "wokers: 2"))
    with pytest.raises(ConfigError, match="wokers"):
        _server_config(["serve", "--config", str(bad)])


def test_events_example_and_environment_file_load():
    from taskcodec.server.events import ENV_PREFIX, EventsConfig

    env = dict(line.split("=", 1) for line in (EXAMPLES / "server.env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert set(env) <= {ENV_PREFIX + "CONFIG"} | {ENV_PREFIX + k.upper() for k in EventsConfig.model_fields}
    cfg = EventsConfig.from_env({ENV_PREFIX + "CONFIG": str(EXAMPLES / "events.yaml")})
    assert cfg.enabled and cfg.mode == "change" and cfg.mqtt.startswith("mqtt://") and cfg.webhook
    assert EventsConfig.from_env({ENV_PREFIX + "CONFIG": str(EXAMPLES / "events.yaml"),
                                  ENV_PREFIX + "MODE": "frame"}).mode == "frame"  # environment wins


def test_containerfile_copies_tracked_files_and_runs_a_valid_command():
    text = (DEPLOY / "Containerfile").read_text()
    lines = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM ") and ":" in lines[0].split()[1]  # a tagged base image
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            for src in line.split()[1:-1]:
                assert any(t == src or t.startswith(src.rstrip("/") + "/") for t in tracked), f"{src} is not tracked"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") and "/healthz" in line for line in lines)
    import json

    entry = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT"))[len("ENTRYPOINT"):])
    cmd = json.loads(next(line for line in lines if line.startswith("CMD"))[len("CMD"):])
    assert entry == ["taskcodec"]
    cfg = _server_config(cmd)
    assert cfg.host == "0.0.0.0" and cfg.port == 8000 and str(cfg.db).startswith("/var/lib/taskcodec/")
