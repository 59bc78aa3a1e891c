"""Starting serve_api.py for real in tests (uvicorn on 127.0.0.1, a free port) and reading its
server-sent events. Used by test_serve.py, test_openai_api.py, test_hostile_serve.py and
test_browser.py."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from conftest import OFFLINE_ENV, REPO


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode

    def access_lines(self) -> list[dict]:
        """The JSON access-log lines the server wrote so far."""
        lines = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"path"' in line:
                lines.append(json.loads(line))
        return lines


def start_server(model: str | Path, root: Path, *args: str, env: dict | None = None, timeout: float = 300,
                 name: str = "server") -> Server:
    """serve_api.py --model=<model> --port=0 <args> with FTF_ROOT=root; waits for /health."""
    log_path = root / f"{name}.log"
    full_env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(root), "OMP_NUM_THREADS": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "serve_api.py"), f"--model={model}", "--port=0", *args],
                                   cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log_path.read_text(errors="replace"))
        if found:
            try:
                if httpx.get(f"{found.group(1)}/health", timeout=5).status_code == 200:
                    return Server(found.group(1), process, log_path)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"server did not start:\n{log_path.read_text()[-3000:]}")


def parse_sse(lines) -> list[tuple[str, object]]:
    """(event type, data) of every event in an iterable of text lines; data is JSON when it parses."""
    events, kind, data = [], "message", []
    for line in lines:
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    value = text
                events.append((kind, value))
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events


def stream_events(url: str, body: dict, headers: dict | None = None, timeout: float = 120) -> list[tuple[str, object]]:
    with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
        assert response.status_code == 200, response.read().decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        return parse_sse(response.iter_lines())
