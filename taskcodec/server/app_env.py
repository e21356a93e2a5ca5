"""App factory for multi-worker `taskcodec serve`: each uvicorn worker process builds its app from the environment."""

from __future__ import annotations

import os

from taskcodec.server.app import create_app


def app():
    return create_app(os.environ.get("TASKCODEC_SERVER_BUNDLE") or None, os.environ["TASKCODEC_SERVER_DB"],
                      microbatch=os.environ.get("TASKCODEC_SERVER_MICROBATCH", "1") == "1")
