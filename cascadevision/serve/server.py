"""`cascadevision serve`: load the model once, bind the address, then run the app under uvicorn.

Everything that can fail at start-up fails before the server starts, as one line: the address is taken or not
ours to bind (checked first), the checkpoint (or exported file) cannot be loaded. Connections that come while
the model loads wait in the socket's backlog.
"""
from __future__ import annotations

import errno
import socket
import sys
from pathlib import Path

import uvicorn

from ..config import ServeConfig, validate
from ..errors import ConfigError
from .app import create_app
from .predictor import load_predictor


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a one-line ConfigError."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        why = "the address is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None


def run_server(source: str | Path, config: ServeConfig | None = None, *, weights: str = "",
               overrides: dict | None = None, device: str = "auto", log_level: str = "info") -> None:
    config = config or ServeConfig()
    validate(config, "serve.")
    sock = bind(config.host, config.port)  # first: a taken port fails before the model loads
    try:
        predictor = load_predictor(source, weights=weights, overrides=overrides, device=device)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {predictor.name} ({len(predictor.class_names)} classes, {predictor.device}) on "
          f"http://{shown}:{port}/", flush=True)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {config.host}: reachable from other machines; there is no authentication",
              file=sys.stderr, flush=True)
    app = create_app(predictor, config)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
