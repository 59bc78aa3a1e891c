"""llama.cpp's side of the llama.cpp backend that is not the runtime: the bindings
(llama-cpp-python, imported only when used), llama.cpp's log (kept so a failed load can be
explained in one line), and the GGUF file helpers (which file a path names, its type, its
architecture, the run record beside it). ship/quantize.py uses them too.
"""
from __future__ import annotations

import ctypes
import os
import sys
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.record import RunRecord, read_record

BINDINGS = "llama-cpp-python==0.3.36"
INSTALL_HINT = f"run `make install-llama` or `pip install {BINDINGS}`"
GGUF_MAGIC = b"GGUF"
# Encoder-decoder architectures: llama.cpp has no BART at all and runs T5 only through its
# encoder API, which this decoder-only backend does not drive; CTranslate2 serves both.
ENCODER_DECODER = ("t5", "t5encoder", "bart", "mbart", "pegasus", "marian", "led")

# ---------------------------------------------------------------------------------------------
# bindings and llama.cpp's log

def bindings():
    """The llama_cpp module, or one line saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"the llama.cpp backend needs llama-cpp-python, which is not installed: "
                        f"{INSTALL_HINT}") from None
    return llama_cpp


_LOG: deque = deque(maxlen=2000)
_CALLBACK = None


@contextmanager
def llama_log(verbose: bool = False):
    """llama.cpp's log goes to stderr only when `verbose`; warnings and errors are kept in _LOG,
    so a failed load can be explained in one line."""
    global _CALLBACK
    llama_cpp = bindings()
    if _CALLBACK is None:
        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            message = text.decode("utf-8", "replace")
            if level >= 3:     # GGML_LOG_LEVEL_WARN (3), ERROR (4), CONT (5)
                _LOG.append(message.strip())
            if _CALLBACK.verbose:
                sys.stderr.write(message)
        callback.verbose = False
        _CALLBACK = callback
    _LOG.clear()
    _CALLBACK.verbose = verbose
    llama_cpp.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
    try:
        yield _LOG
    finally:
        from llama_cpp import _logger   # back to llama-cpp-python's own callback, quiet below ERROR
        if _logger.logger.level == 0:
            _logger.set_verbose(False)
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def load_error(log) -> str:
    """The line of llama.cpp's log that says why a load failed: the loader's own reason, or the
    GGUF parser's when the loader only says that it failed."""
    errors = [line for line in log if "error" in line.lower() or "failed" in line.lower()]
    reasons = [line.split("error loading model:", 1)[1].strip() for line in errors if "error loading model:" in line]
    reasons = [r for r in reasons if not r.startswith("llama_model_loader: failed to load model from")]
    parser = [line.split(":", 1)[1].strip() for line in errors if line.startswith("gguf_init")]
    best = (reasons or parser or [line for line in errors if "failed to load model" not in line] or errors or [""])[0]
    return best or "llama.cpp could not load it"


# ---------------------------------------------------------------------------------------------
# files

def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: itself, or the only .gguf in a folder; None otherwise."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if path.is_dir():
        found = sorted(p for p in path.glob("*.gguf") if p.is_file() and not p.name.startswith("."))
        return found[0] if len(found) == 1 else None
    return None


def gguf_file(path: str | Path) -> Path:
    """The GGUF to load, or one line saying what is wrong with `path`."""
    from finetuneflow.contract.paths import resolve
    path = resolve(path)
    if not path.exists():
        raise UserError(f"GGUF file not found: {path} (export one with `python export_gguf.py`, or pass a .gguf "
                        f"from Ollama, LM Studio or llama.cpp)")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.gguf") if p.is_file() and not p.name.startswith("."))
        if len(found) != 1:
            what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(found[:4])})"
            raise UserError(f"{path} holds {what}; pass the .gguf file itself")
        path = path / found[0]
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf file")
    return path


def file_type_name(meta: dict) -> str:
    """"q8_0", "q4_k_m", "f16", "f32", ... from general.file_type (llama.cpp's llama_ftype)."""
    import gguf
    try:
        name = gguf.LlamaFileType(int(meta.get("general.file_type"))).name
    except (TypeError, ValueError):
        return "unknown"
    return name.replace("MOSTLY_", "").replace("ALL_", "").lower()


def gguf_architecture(path: Path) -> str | None:
    """general.architecture read by gguf-py (used when llama.cpp refused the file: slow on large
    vocabularies, so not on the normal path, where llama.cpp's own metadata is used)."""
    try:
        import gguf
        field = gguf.GGUFReader(str(path)).fields.get("general.architecture")
        return field.contents() if field is not None else None
    except Exception:   # truncated or corrupt: llama.cpp's message says it
        return None


def refuse_architecture(name: str, arch: str | None) -> None:
    if arch in ENCODER_DECODER:
        kind = arch.upper()
        raise UserError(f"{name} is a {kind} GGUF (encoder-decoder): the llama.cpp backend runs decoder-only models "
                        f"(llama.cpp has no BART; its T5 needs an encoder pass this backend does not run); serve "
                        f"{kind} with CTranslate2: python export_gguf.py --MODEL=<merged model folder> --FORMAT=ct2")


def gguf_record(path: Path) -> RunRecord | None:
    """The run record export_gguf.py wrote beside the file (`<stem>.run_config.json`), if any."""
    return read_record(path.parent, f"{path.stem}.run_config.json") or read_record(path.parent)


def default_threads() -> int:
    value = os.environ.get("FTF_LLAMA_THREADS")
    if value:
        if not value.strip().isdigit() or int(value) < 1:
            raise UserError(f"FTF_LLAMA_THREADS={value!r} is not a positive whole number of threads")
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
