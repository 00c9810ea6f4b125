"""HTTP endpoint for a Governor's metrics: GET /metrics (Prometheus text) and GET /snapshot.json.

Served by a `ThreadingHTTPServer` on a daemon thread, so it never blocks the engine or process exit:

    server = MetricsServer(governor, port=9464).start()   # port 0 = any free port; see server.port
    ...
    server.stop()
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dspark_jax.governance.prometheus import CONTENT_TYPE


class MetricsServer:
    """Serves one Governor's /metrics and /snapshot.json on `host:port` from a background thread."""

    def __init__(self, governor, host: str = "127.0.0.1", port: int = 9464):
        self.governor, self.host, self.requested_port = governor, host, port
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "MetricsServer":
        if self._httpd is not None:
            return self
        governor = self.governor

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 -- http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, CONTENT_TYPE, governor.prometheus_text().encode())
                elif path == "/snapshot.json":
                    self._send(200, "application/json", json.dumps(governor.snapshot(), allow_nan=False).encode())
                else:
                    self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /snapshot.json\n")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # noqa: A002 -- scrapes are not worth a log line each
                pass

        self._httpd = ThreadingHTTPServer((self.host, self.requested_port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs=dict(poll_interval=0.1),
                                        name="dspark-metrics", daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the metrics server is not running")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> "MetricsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
