"""The `taskcodec` command. Each part of the project registers its own commands (``register(app)`` in its cli
module); heavy imports (torch, onnx, fastapi) happen inside the commands, so `--help` is fast and a runtime-only
install still works for the commands it has."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="taskcodec",
    help="Task-centric image codec: train invariant compressors, export bundles, serve, run cameras, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

@app.command()
def version() -> None:
    """Print the taskcodec version."""
    from taskcodec import __version__

    typer.echo(__version__)


_PARTS = (
    "training.cli",
    "training.frozen_cli",
    "export.cli",
    "calibration.cli",
    "server.cli",
    "runtime.cli",
    "bench.cli",
    "firmware_bridge.cli",
    "taskcodec.demo_cli",
)


def _register_parts() -> None:
    for name in _PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A part that is not there yet, or whose optional dependencies are not installed, adds no commands.
            if exc.name and (exc.name == name or name.startswith(exc.name + ".") or exc.name not in name):
                continue
            raise
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_parts()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
