"""One `llama-server` process on one GGUF, always stopped: the server users run, driven by the gate.

`LlamaServer(gguf, ...)` is a context manager: it starts llama.cpp's own server (ship/llama_tools.py
finds the program) on 127.0.0.1 and a free port (or the port the user pinned: taken -> one error
line), with the GGUF's own chat template (`--jinja`), one slot, the given threads and context, and
waits until it answers `/health`. `chat(messages, ...)` sends one OpenAI-style
`/v1/chat/completions` request and returns the text and the finish reason ("stop" | "length").

The process is stopped when the block ends, also on errors, Ctrl-C and SIGTERM (the block turns
SIGTERM into KeyboardInterrupt), at interpreter exit, and, on Linux, when the Python process dies
without cleaning up (the child asks the kernel for SIGTERM when its parent goes: PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import atexit
import ctypes
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from finetuneflow.contract.errors import UserError

HOST = "127.0.0.1"
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 600
_RUNNING: set = set()


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def check_port(port: int | None, setting: str = "SERVER_PORT") -> None:
    """A pinned port must be free now (checked before anything is written)."""
    if port is not None and not port_free(int(port)):
        raise UserError(f"{setting}={port}: that port is already in use on {HOST}; pick a free port or leave "
                        f"{setting} unset (the gate then takes a free one)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:   # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread (so `finally` runs)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LlamaServer:
    """llama-server on `gguf` (see the module docstring); `args` are extra command-line flags."""

    def __init__(self, program: Path, gguf: Path, *, threads: int, ctx_size: int, n_predict: int,
                 port: int | None = None, args: tuple[str, ...] = ()):
        self.program, self.gguf, self.port = Path(program), Path(gguf), port
        self.command = [str(program), "-m", str(gguf), "--host", HOST, "--jinja", "-np", "1", "-c", str(ctx_size),
                        "-t", str(threads), "-tb", str(threads), "-n", str(n_predict), "--temp", "0", "--top-k", "1",
                        "--repeat-penalty", "1", "--reasoning-format", "none", "--no-webui", "--offline", *args]
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "LlamaServer":
        check_port(self.port)
        self.port = self.port or free_port()
        self._log = tempfile.TemporaryFile(mode="w+b")
        self.process = subprocess.Popen([*self.command, "--port", str(self.port)], stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        _RUNNING.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 3) -> str:
        if self._log is None or self._log.closed:
            return ""
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace")
        wanted = [line for line in text.splitlines() if "error" in line.lower()] or text.splitlines()
        return " | ".join(line.strip() for line in wanted[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"llama-server exited with code {self.process.returncode} on {self.gguf.name}: "
                                f"{self.log_tail() or 'no output'}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        raise UserError(f"llama-server did not answer on {self.url} within {START_TIMEOUT_S} s ({self.log_tail()})")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
        _RUNNING.discard(self)
        if self._log is not None:
            self._log.close()

    def chat(self, messages: list[dict], *, max_tokens: int, stop: list[str], seed: int = 0) -> tuple[str, str]:
        """(text, finish reason) of one greedy chat completion, as an OpenAI client sends it."""
        body = {"messages": messages, "temperature": 0, "top_k": 1, "repeat_penalty": 1.0, "max_tokens": max_tokens,
                "stop": stop, "seed": seed, "stream": False}
        request = urllib.request.Request(f"{self.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as answer:
                reply = json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise UserError(f"llama-server answered {exc.code} on {self.gguf.name}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise UserError(f"llama-server stopped answering on {self.gguf.name} ({exc}; {self.log_tail()})") from None
        choice = reply["choices"][0]
        return choice["message"].get("content") or "", choice.get("finish_reason") or "?"


@atexit.register
def _stop_all() -> None:
    for server in list(_RUNNING):
        try:
            server.stop()
        except Exception:
            print(f"could not stop llama-server pid {getattr(server.process, 'pid', '?')}", file=sys.stderr)
