""".env: read at start by every stage and the server (python-dotenv), the environment wins, a
malformed line is one error naming it; .env_example.txt lists every environment variable the code
reads (found by grepping the code)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx

from conftest import OFFLINE_ENV, REPO, SAMPLES, error_line, run_stage

READ = re.compile(r"""(?:os\.environ(?:\.get|\.setdefault|\.pop)?\(\s*|os\.environ\[\s*|getenv\(\s*)"""
                  r"""["']([A-Z][A-Z0-9_]+)["']"""
                  r"""|["']([A-Z][A-Z0-9_]+)["']\s+(?:not\s+)?in\s+os\.environ|^[A-Z_]*ENV\s*=\s*["']([A-Z][A-Z0-9_]+)["']""",
                  re.M)
# read through a variable (`os.environ.get(v) for v in (...)`), so the pattern above cannot see them
INDIRECT = {"HTTPS_PROXY": "quality/metrics.py", "ALL_PROXY": "quality/metrics.py"}
# listed because a library the stages use reads them, not this code
LIBRARIES = {"HF_TOKEN": "huggingface_hub",
             "FTF_CPU_BF16": "the CPU bf16 probe override (train/precision.py, issue 23)"}


def code_files():
    return [p for pattern in ("finetuneflow/**/*.py", "*.py", "scripts/*.py", "benchmarks/*.py")
            for p in REPO.glob(pattern)]


def names_read_by_the_code() -> dict[str, str]:
    found = {}
    for path in code_files():
        for match in READ.finditer(path.read_text(encoding="utf-8")):
            found.setdefault(next(g for g in match.groups() if g), str(path.relative_to(REPO)))
    return {**found, **INDIRECT}


def names_listed() -> set[str]:
    text = (REPO / ".env_example.txt").read_text(encoding="utf-8")
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.M))


def test_env_example_lists_every_variable_the_code_reads():
    read, listed = names_read_by_the_code(), names_listed()
    assert {"FTF_ROOT", "WANDB_MODE", "FTF_API_TOKEN", "WORLD_SIZE"} <= set(read)   # the grep finds them
    missing = {name: where for name, where in read.items() if name not in listed}
    assert not missing, f"read by the code but not in .env_example.txt: {missing}"
    stale = listed - set(read) - set(LIBRARIES)
    assert not stale, f"in .env_example.txt but read by nothing: {sorted(stale)}"


def python_with(project, code: str, env: dict | None = None) -> str:
    full = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(project), **(env or {})}
    full = {k: v for k, v in full.items() if v is not None}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=120, check=True).stdout.strip()


def test_the_env_file_is_read_and_the_environment_wins(tmp_path):
    (tmp_path / ".env").write_text("# mine\nFTF_TEST_A=from-file\nexport FTF_TEST_B = 'quoted # not a comment'\n"
                                   "FTF_TEST_C=${FTF_TEST_A}-again\nFTF_TEST_D=from-file\nFTF_TEST_E=\n")
    code = ("import finetuneflow, os; print('|'.join(os.environ.get(k, '-') for k in "
            "('FTF_TEST_A', 'FTF_TEST_B', 'FTF_TEST_C', 'FTF_TEST_D', 'FTF_TEST_E')))")
    out = python_with(tmp_path, code, {"FTF_TEST_D": "from-environment"})
    assert out == "from-file|quoted # not a comment|from-file-again|from-environment|-"


def test_the_example_file_is_a_valid_env_file(tmp_path):
    (tmp_path / ".env").write_text((REPO / ".env_example.txt").read_text(encoding="utf-8"))
    out = python_with(tmp_path, "import finetuneflow, os; from finetuneflow.contract import environment as e; "
                                "print(e.problem, os.environ.get('WANDB_PROJECT'))", {"WANDB_PROJECT": None})
    assert out == "None finetuneflow"


def test_a_malformed_line_is_one_error_naming_it(tmp_path):
    (tmp_path / ".env").write_text("WANDB_MODE=disabled\n\nthis line has no equals sign\nHF_TOKEN=x\n")
    result = run_stage("inspect_dataset.py", f"--dataset={SAMPLES}", "--model_name=", root=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_line(result) == (f"error: {tmp_path / '.env'} line 3: cannot parse 'this line has no equals sign'; "
                                  f"write NAME=value (quote a value holding spaces or #), or remove the line")
    assert not (tmp_path / "metrics").exists()   # the stage did not start


def test_the_server_takes_its_token_from_the_env_file(tmp_path, tiny_models):
    from serving_helpers import start_server
    (tmp_path / ".env").write_text("FTF_API_TOKEN=from-dotenv\n")
    env = {"FTF_API_TOKEN": None}   # not in the environment: the file decides
    server = start_server(tiny_models["llama"], tmp_path, "--max_new_tokens_limit=4", env=env, name="dotenv")
    try:
        body = {"dialogue": "Anna: lunch?\nBen: yes.", "generation": {"max_new_tokens": 2}}
        assert httpx.post(f"{server.url}/summarize", json=body, timeout=60).status_code == 401
        ok = httpx.post(f"{server.url}/summarize", json=body, timeout=120,
                        headers={"Authorization": "Bearer from-dotenv"})
        assert ok.status_code == 200, ok.text
    finally:
        server.stop()
