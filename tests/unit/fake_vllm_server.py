"""A stand-in for vLLM's server process in the supervisor tests (stdlib only, starts at once).

    python fake_vllm_server.py PORT MODE STATE_DIR

MODE: ``serve`` answers GET /health; ``hang`` answers /health until STATE_DIR/hang exists, then
stops answering while staying alive; ``fail`` prints an import error and exits 1. Every start is
recorded in STATE_DIR/starts, and a child process (like vLLM's EngineCore) writes its pid to
STATE_DIR/child.<pid> so tests can check the whole process group is gone after stop().
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    port, mode, state = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    with (state / "starts").open("a") as starts:
        starts.write(f"{time.time()}\n")
    if mode == "fail":
        print("ModuleNotFoundError: No module named 'vllm'", flush=True)
        sys.exit(1)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (state / f"child.{child.pid}").write_text(str(child.pid))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if mode == "hang" and (state / "hang").exists():
                time.sleep(60)
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("fake vLLM ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
