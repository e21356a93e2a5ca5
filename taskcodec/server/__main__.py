"""`python -m taskcodec.server serve ...` / `python -m taskcodec.server cameras ...`: the server commands without the other parts."""

import typer

from taskcodec.server.cli import register

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
register(app)

if __name__ == "__main__":
    app()
