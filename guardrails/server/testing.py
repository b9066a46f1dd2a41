"""Running the app under uvicorn: the server ``serve`` uses, and a live one on loopback for tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

#: seconds uvicorn waits, after the worker has answered everything, for responses still being written
_WRITE_GRACE_S = 15.0


class GuardedServer(uvicorn.Server):
    """uvicorn's server, with the model worker closed first when shutdown starts.

    uvicorn's own graceful shutdown cancels handlers that outlive its timeout, and a cancelled
    handler answers nothing. Closing the worker first (requests in flight finish for
    ``shutdown_grace_s``, the rest get a JSON 503) means every request has its answer before
    uvicorn closes the connections.
    """

    def __init__(self, app: Any, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
        # Any ASGI app can be served; only ours (create_app) has a worker to close first.
        self.worker = getattr(app.state, "worker", None)
        self.grace = float(getattr(getattr(app.state, "config", None), "shutdown_grace_s", 30.0))
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                        timeout_graceful_shutdown=int(self.grace + _WRITE_GRACE_S)))

    async def shutdown(self, sockets: Any = None) -> None:
        if self.worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.worker.close, self.grace)
        await super().shutdown(sockets)


@contextlib.contextmanager
def running_server(app: Any, *, startup_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``app`` in a background thread on a free loopback port; yields ``"http://127.0.0.1:PORT"``.

    On exit the server shuts down as on SIGTERM (see :class:`GuardedServer`) and the thread is joined.
    """
    server = GuardedServer(app, port=0, log_level="warning")
    thread = threading.Thread(target=server.run, name="guardrails-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the test server did not start (see the log above)")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(120)
