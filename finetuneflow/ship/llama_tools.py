"""llama.cpp's own command-line tools: where they are, and one line when one is missing.

`make install-llama-tools` (scripts/install_llama_tools.sh) builds `llama-server`, `llama-quantize`
and `llama-imatrix` once from the llama.cpp source the installed bindings (llama-cpp-python) were
built from, into `.cache/llama-tools/<bindings version>/bin` under the code folder (gitignored).
`FTF_LLAMA_TOOLS=<dir>` points elsewhere (a folder holding the three programs). Nothing is taken
from PATH: a `llama-server` of another llama.cpp version would tokenize, template and round
differently from the bindings the project measured with.

`find_tool(name)` returns the program or None; `missing(name)` is the one line a step prints when
it is skipped because the program is not there.
"""
from __future__ import annotations

import os
from pathlib import Path

from finetuneflow.contract.paths import CODE_ROOT

TOOLS = ("llama-server", "llama-quantize", "llama-imatrix")
INSTALL = "make install-llama-tools"
ENV = "FTF_LLAMA_TOOLS"


def bindings_version() -> str | None:
    """The installed llama-cpp-python's version (the llama.cpp source the tools are built from)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def tools_folder() -> Path | None:
    """$FTF_LLAMA_TOOLS, else .cache/llama-tools/<bindings version>/bin (None: no bindings to key it by)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    version = bindings_version()
    return CODE_ROOT / ".cache" / "llama-tools" / version / "bin" if version else None


def find_tool(name: str) -> Path | None:
    """The program `name` (one of TOOLS), or None when it is not installed."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; known: {', '.join(TOOLS)}")
    folder = tools_folder()
    if folder is None:
        return None
    path = folder / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


def missing(name: str) -> str:
    """Why `name` cannot run here and how to get it, in one line."""
    folder = tools_folder()
    if folder is None:
        return f"{name} not found: llama-cpp-python is not installed (make install-llama, then {INSTALL})"
    where = f"${ENV}={folder}" if os.environ.get(ENV) else str(folder)
    return f"{name} not found in {where} (build it once with `{INSTALL}`, ~10 min on 2 cores)"
