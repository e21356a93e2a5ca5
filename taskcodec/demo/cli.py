"""Command: `taskcodec demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo_cmd(
        frames: int = typer.Option(600, min=1, help="Frames the virtual camera streams."),
        fps: float = typer.Option(30.0, min=0.1, help="Camera frame rate."),
        max_delay: float = typer.Option(0.0, min=0.0, help="Extra uplink batching delay in seconds (the runtime's "
                                        "capture window of 0.3 s already groups frames)."),
        bundle: Optional[Path] = typer.Option(None, help="Model bundle (default: the embedded default bundle)."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON."),
        quiet: bool = typer.Option(False, help="No live status line."),
    ) -> None:
        """Run the whole chain locally: virtual camera -> runtime -> local server; print the operator's report."""
        from taskcodec.demo.run import format_report, run_demo, to_json

        result = run_demo(frames, fps, max_delay, bundle, quiet=quiet)
        typer.echo(format_report(result))
        if json_out:
            json_out.write_text(to_json(result) + "\n")
        if result.stored != result.frames:
            typer.echo(f"error: {result.frames - result.stored} frames were not stored", err=True)
            raise typer.Exit(1)
