"""`reslab serve`: a local page and JSON API for one checkpoint (see docs/serve.md)."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from pathlib import Path

from reslab.engine.checkpoint import load_checkpoint
from reslab.errors import ReslabError, check_whole


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: any free port), or one line saying why not."""
    if not 0 <= port <= 65535:
        raise ReslabError(f"--port must be 0 to 65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise ReslabError(f"--host {host}: not an address or name this machine knows") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ReslabError(
                f"port {port} on {host} is already in use; stop what holds it or give --port"
            ) from None
        raise ReslabError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(2048)
    return sock


def run_folder(source: str | Path) -> Path:
    """The run folder of a checkpoint or of a run: where its curves and confusion matrix are."""
    source = Path(source)
    return source if source.is_dir() else source.parent


def serve(
    source: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    precision: str = "auto",
    fast_path: bool = True,
    max_batch: int = 32,
    max_wait: float = 0.002,
    threads: int = 0,
    say: Callable[[str], None] = print,
) -> None:
    """Serve the checkpoint (or run folder) ``source`` until Ctrl-C or SIGTERM; ``threads``:
    torch's CPU threads for the model (0: torch's default)."""
    import torch
    import uvicorn

    from reslab.serve.app import create_app
    from reslab.serve.models import load_service

    check_whole("max-batch", max_batch)
    check_whole("threads", threads, least=0)
    payload = load_checkpoint(source)
    sock = bind(host, port)
    if threads:
        torch.set_num_threads(threads)
    try:
        service = load_service(payload, precision, fast_path)
        app = create_app(service, run_folder(source), max_batch, max_wait)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        server = uvicorn.Server(config)
        where = sock.getsockname()
        say(f"serving {payload['model']['name']} at http://{host}:{where[1]}/ (Ctrl-C stops)")
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has stopped
            pass
        say("stopped")
    finally:
        sock.close()
