"""`sdrt serve` in a thread of this process, on a free loopback port, with the real server settings
(uvicorn_config: header deadline, size limits, graceful drain): what the load test, the fuzzer and the
server tests talk to over HTTP."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import replace
from typing import Any

from sdrt.serve.config import ServeConfig
from sdrt.serve.app import create_app, uvicorn_config

# where uvicorn and sdrt report failed requests, and where Python's warnings go once captured
LOGGERS = {"uvicorn.error": logging.ERROR, "sdrt.serve": logging.ERROR, "py.warnings": logging.WARNING}


class _Collect(logging.Handler):
    def __init__(self, into: list[str], level: int):
        super().__init__(level)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(f"{record.name}: {record.getMessage()}" + (f" ({record.exc_info[1]!r})" if record.exc_info else ""))


class LiveServer:
    """Ready (GET /ready is 200) when constructed; stop() ends it. `errors` collects what the server
    logs at ERROR or above meanwhile (an exception in a handler, even one whose client had gone) and
    Python warnings (a RuntimeWarning from numpy is a value that slipped through validation)."""

    def __init__(self, config: ServeConfig, ready_within_s: float = 60.0, pipeline: Any = None):
        import httpx
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.config = replace(config, host="127.0.0.1", port=port)
        self.url = f"http://127.0.0.1:{port}"
        self.errors: list[str] = []
        self._handlers = {name: _Collect(self.errors, level) for name, level in LOGGERS.items()}
        for name, handler in self._handlers.items():
            logging.getLogger(name).addHandler(handler)
        logging.captureWarnings(True)
        self.app = create_app(self.config, pipeline)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.config, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + ready_within_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", headers=self.headers(), timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not become ready within {ready_within_s:g} s")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.token}"} if self.config.token else {}

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent)."""
        import httpx

        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        for name, handler in self._handlers.items():
            logging.getLogger(name).removeHandler(handler)
        logging.captureWarnings(False)


__all__ = ["LiveServer"]
