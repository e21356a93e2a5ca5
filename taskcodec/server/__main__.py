"""`python -m taskcodec.server serve ...` / `python -m taskcodec.server cameras ...`: the server commands without the other parts."""

import typer

from taskcodec.server.cli import register
from taskcodec.server.models_cli import register as register_models

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
register(app)
register_models(app)  # taskcodec models ..., cameras set-group

if __name__ == "__main__":
    app()
