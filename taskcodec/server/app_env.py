"""App factory for multi-worker `taskcodec serve`: each uvicorn worker process builds its app from the validated
configuration the parent put in the environment (TASKCODEC_SERVER_CONFIG, JSON; it holds no secrets)."""

from __future__ import annotations

import os

from taskcodec.server.app import create_app
from taskcodec.server.config import ServerConfig


def app():
    config = ServerConfig.model_validate_json(os.environ["TASKCODEC_SERVER_CONFIG"])
    from taskcodec.server.cli import configure_logging

    configure_logging(config.log_level)  # a spawned worker starts with bare logging
    return create_app(config.bundle, config=config)
