"""The `taskcodec` command. Each part of the project registers its own commands (``register(app)`` in its cli
module); heavy imports (torch, onnx, fastapi) happen inside the commands, so `--help` is fast and a runtime-only
install still works for the commands it has."""

from __future__ import annotations

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


ENTRY_POINT_GROUP = "taskcodec.commands"


def _register_parts() -> None:
    """Each part declares ``register(app)`` under the ``taskcodec.commands`` entry point group (pyproject.toml), so
    this core module names no application above it."""
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except ModuleNotFoundError as exc:
            # A part whose optional dependencies are not installed (torch on an edge install) adds no commands.
            if exc.name and not exc.name.startswith("taskcodec"):
                continue
            raise
        register(app)


_register_parts()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
