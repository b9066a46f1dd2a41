"""A live server on a free loopback port, for tests and the load benchmark."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def running_server(app: Any, *, startup_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields ``"http://127.0.0.1:PORT"``.

    On exit the server shuts down as on SIGTERM (requests in flight finish, the app's lifespan
    ends) and the thread is joined.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
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
