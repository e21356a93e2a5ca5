"""`taskcodec firmware ...`: build the C firmware library and tools, run the example camera, listen, fuzz."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    fw = typer.Typer(help="C code for camera firmware: wire-format library, frame socket, example camera.",
                     no_args_is_help=True)
    app.add_typer(fw, name="firmware")

    @fw.command("build")
    def build_cmd(
        out: Optional[Path] = typer.Option(None, help="folder for the binaries (default: the build cache)"),
        sanitize: bool = typer.Option(False, help="build with AddressSanitizer + UBSan"),
        cc: Optional[str] = typer.Option(None, help="C compiler (default: $CC, cc, gcc, clang)"),
    ) -> None:
        """Compile the static library, the example camera, the C tests, the fuzz harness and the cross-check tool."""
        from rich.console import Console
        from rich.table import Table

        from taskcodec.firmware_bridge import build

        console = Console()
        table = Table("target", "path")
        try:
            with console.status("compiling ..."):
                table.add_row("libtaskcodec_fw.a", str(build.build_library(cc=cc, out_dir=out)))
                for target in build.TARGETS:
                    table.add_row(target, str(build.build(target, sanitize=sanitize, cc=cc, out_dir=out)))
        except build.BuildError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1)
        table.add_row("headers", ", ".join(str(build.source(h)) for h in build.HEADERS))
        console.print(table)

    @fw.command("tables")
    def tables_cmd(
        bundle: Optional[Path] = typer.Argument(None, help="bundle folder (default: the embedded one)"),
        out: Path = typer.Option(..., "--out", help="file for the tables blob (tcc_blob_load in taskcodec_coder.h)"),
    ) -> None:
        """Write a bundle's integer entropy tables as the blob firmware loads to encode and decode payloads in C."""
        from taskcodec.bundle import BundleError, load_bundle

        try:
            b = load_bundle(bundle)
        except BundleError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2)
        blob = b.tables.to_blob()
        out.write_bytes(blob)
        typer.echo(f"{out}: {len(blob)} bytes, {b.tables.dim} dimensions, {b.tables.precision}-bit CDF, "
                   f"model tag {b.model_id}")

    @fw.command("example", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def example_cmd(
        ctx: typer.Context,
        socket: Path = typer.Argument(..., help="the runtime's frame socket (the PATH of its fw://PATH source)"),
    ) -> None:
        """Build and run fw_camera_example: send frames to SOCKET. Extra options go to the program:
        --frames N --width W --height H --format gray8|bgr24|rgb24 --raw FILE --labels FILE --fps F --ts0 MS
        --dt MS --wait SECONDS."""
        from taskcodec.firmware_bridge import build

        try:
            exe = build.build("fw_camera_example")
        except build.BuildError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1)
        raise typer.Exit(subprocess.run([str(exe), str(socket), *ctx.args]).returncode)

    @fw.command("fuzz")
    def fuzz_cmd(
        seconds: float = typer.Option(10.0, help="time budget"),
        seed: int = typer.Option(1, help="mutation seed (a failure replays with the same seed)"),
        coder_inputs: int = typer.Option(200000, "--coder-inputs", min=0,
                                         help="also decode this many random and mutated payloads with the default "
                                              "bundle's tables in the C entropy coder (0: skip)"),
    ) -> None:
        """Fuzz the C wire decoder and encoders, and the C payload decoder, under AddressSanitizer + UBSan."""
        import tempfile

        from taskcodec.firmware_bridge import build

        try:
            exe = build.build("fuzz_wire", sanitize=True)
            coder_exe = build.build("tcc_tool", sanitize=True) if coder_inputs else None
        except build.BuildError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1)
        proc = subprocess.run([str(exe), str(10**12), str(seed), str(seconds)], env=build.sanitizer_env())
        if proc.returncode or coder_exe is None:
            raise typer.Exit(proc.returncode)
        from taskcodec.bundle import load_bundle

        with tempfile.TemporaryDirectory() as tmp:
            blob = Path(tmp) / "tables.tcct"
            blob.write_bytes(load_bundle().tables.to_blob())
            coder = subprocess.run([str(coder_exe), str(blob)], input=f"fuzz {coder_inputs} {seed}\n", text=True,
                                   capture_output=True, env=build.sanitizer_env())
        if coder.returncode or not coder.stdout.startswith("ok "):
            typer.echo(f"payload decoder: FAILED\n{coder.stdout}{coder.stderr[-5000:]}", err=True)
            raise typer.Exit(1)
        tried, refused = coder.stdout.split()[1:3]
        typer.echo(f"payload decoder: {tried} inputs, {refused} refused, no sanitizer finding")
