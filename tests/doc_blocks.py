"""The documentation as a user pastes it: the shell blocks of README.md and docs/*.md and the `!python`
cells of the Colab notebook. Used by tests/test_docs.py and tests/test_notebook.py.

- `blocks(path)`: every fenced block with its language, line and doc-test mark. A mark is an HTML
  comment on the line just above a block, `<!-- doc-test: skip gpu -->`; MARKS says which exist.
- `flag_problems(...)`: every `--NAME` given to a stage script (`python train_bart_lora.py --epochs=1`,
  `accelerate launch ... eval_bart_lora.py ...`, `!python ...` in the notebook) must be a setting the
  stage declares today (or `--config` / `--help`), so a renamed flag fails even in a block that
  cannot run here. Shell variables assigned earlier in the same file (`DATA="--dataset=..."`) are
  expanded first.
- `make_project(...)`: a temporary project root (FTF_ROOT) where the repository's files are linked in,
  so `python train_bart_lora.py` works from it while every output stays in the temporary folder;
  `data/my_dialogues.csv` holds 40 dialogues with the columns `conversation` and `notes`.
- `run_shell(...)`: the unmarked blocks of one file, in order, in one bash (`set -e`), as one
  terminal session; a server a block started in the background is stopped at the end.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SAMPLES = REPO / "data" / "samples" / "dialogues.jsonl"
SHELL_LANGS = {"bash", "sh", "shell"}
MARK = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")
MARKS = {
    "skip gpu": "needs a CUDA GPU",
    "skip hub": "downloads models or data from the Hugging Face Hub",
    "skip long": "runs for many minutes (the whole suite, the demo, a reproduction)",
    "skip tool": "needs a program FineTuneFlow does not install (Ollama, llama.cpp's own binaries)",
    "skip install": "installs packages or changes the Python environment",
}
# The model ids the docs use, and the tiny stand-ins a test gives them (keys of `tiny`).
MODEL_IDS = {"HuggingFaceTB/SmolLM2-135M-Instruct": "llama", "facebook/bart-large-cnn": "bart"}
DOC_PORT = "8000"
# Never linked into a test project: outputs and caches stay in the temporary folder.
NOT_LINKED = {".git", ".cache", ".venv", "data", "ft_outputs", "metrics", "outputs", "models", "runs", "wandb",
              ".env", "__pycache__", ".pytest_cache", ".ruff_cache"}


@dataclass
class Block:
    file: Path
    line: int           # 1-based line of the opening fence
    lang: str
    text: str
    mark: str | None    # "skip gpu", ... or None (the block runs)

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(REPO)}:{self.line}"


def doc_files() -> list[Path]:
    """README.md first (the walkthrough), then the pages under docs/ in name order."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file. A mark that is not directly above a block, or an
    unclosed fence, is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i, pending = [], 0, None
    while i < len(lines):
        line = lines[i]
        mark = MARK.match(line.strip())
        if mark:
            pending = (mark.group(1), i + 1)
        elif line.startswith("```"):
            fence = re.match(r"^(`{3,})\s*([\w+-]*)", line)
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence.group(1)), None)
            if end is None:
                raise AssertionError(f"{path.name}:{i + 1}: unclosed code block")
            found.append(Block(path, i + 1, fence.group(2).lower(), "\n".join(lines[i + 1:end]) + "\n",
                               pending[0] if pending else None))
            pending, i = None, end
        elif line.strip() and pending:
            raise AssertionError(f"{path.name}:{pending[1]}: a doc-test mark must sit on the line just above a block")
        i += 1
    if pending:
        raise AssertionError(f"{path.name}:{pending[1]}: a doc-test mark after the last block")
    return found


def prose_words(path: Path) -> int:
    """Words of a Markdown file outside fenced code blocks and HTML comments."""
    text = re.sub(r"^(`{3,}).*?^\1\s*$", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return len(re.findall(r"[A-Za-z0-9][\w'.,/%+-]*", text))


# ----------------------------------------------------------------------------- flags

@cache
def stage_scripts() -> dict[str, set[str]]:
    """{script name: the setting names it declares (upper case)} for every stage at the root."""
    from finetuneflow.contract.settings import CONFIG_FLAG, declared_settings
    stages = {}
    for path in sorted(REPO.glob("*.py")):
        if "run_cli(" in path.read_text(encoding="utf-8"):
            names = {s.name for s in declared_settings({"__file__": str(path)})}
            stages[path.name] = names | {CONFIG_FLAG.upper(), "HELP"}
    return stages


def _logical_lines(text: str) -> list[str]:
    """Shell lines with `\\` continuations joined; comments dropped; a leading `!` (notebook) removed."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("!"):
            line = line[1:]
        if line and not line.startswith("#"):
            out.append(line)
    return out


_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def _expand(line: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: variables.get(m.group(1), m.group(0)), line)


def stage_flags(text: str, variables: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(script, NAME) for every `--NAME` passed to a stage script in `text`. `variables` collects
    the simple assignments seen so far (VAR=value), shared across the blocks of one file."""
    variables = {} if variables is None else variables
    stages = set(stage_scripts())
    found = []
    for line in _logical_lines(text):
        assign = _ASSIGN.match(line)
        value = assign.group(2).strip() if assign else ""
        if assign and (value[:1] in "\"'" or " " not in value):   # VAR="..." or VAR=word (not VAR=1 cmd ...)
            variables[assign.group(1)] = _expand(value.strip("\"'"), variables)
            continue
        try:
            lexer = shlex.shlex(_expand(line, variables), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)
        except ValueError:
            tokens = _expand(line, variables).split()
        script = None
        for token in tokens:
            if token in {"|", "||", "&&", ";", "&", "(", ")"}:
                script = None
            elif script is None and Path(token).name in stages and not token.startswith("-"):
                script = Path(token).name
            elif script is None and re.fullmatch(r"train_[\w.-]+\.sh", Path(token).name):
                script = "train_bart_lora.py"   # recommend_finetune.py's launch script passes flags through
            elif script and token.startswith("--") and token[2:].split("=", 1)[0] != "NAME":   # a placeholder
                found.append((script, token[2:].split("=", 1)[0]))
    return found


def flag_problems(texts: list[tuple[str, str]]) -> list[str]:
    """Unknown flags in [(where, text), ...] (texts of one file, in order)."""
    stages, variables, problems = stage_scripts(), {}, []
    for where, text in texts:
        for script, flag in stage_flags(text, variables):
            if flag.replace("-", "_").upper() not in stages[script]:
                problems.append(f"{where}: {script} has no setting --{flag}")
    return problems


def inline_commands(path: Path) -> list[str]:
    """Inline code spans of a Markdown file's prose that run a stage (`python x.py --a=1`)."""
    text = re.sub(r"^(`{3,}).*?^\1\s*$", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return [span for span in re.findall(r"`([^`\n]+)`", text) if re.search(r"\w+\.py\b", span)]


# ----------------------------------------------------------------------------- running

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dialogue_rows() -> list[dict]:
    """40 dialogues: the 36 bundled samples plus 4 of them with the two DialogSum speakers swapped
    (different text, so training and evaluation see different dialogues)."""
    rows = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]

    def swap(text: str) -> str:
        return text.replace("#Person1#", "\0").replace("#Person2#", "#Person1#").replace("\0", "#Person2#")
    extra = [{"id": r["id"] + "-swapped", "dialogue": swap(r["dialogue"]), "summary": swap(r["summary"])}
             for r in rows if r["dialogue"].startswith("#Person1#")][:4]
    return rows + extra


def make_project(root: Path) -> Path:
    """A project root that looks like the repository to a user: code linked in, outputs its own,
    data/samples linked, data/my_dialogues.csv written (columns `conversation`, `notes`)."""
    root.mkdir(parents=True, exist_ok=True)
    for entry in REPO.iterdir():
        if entry.name not in NOT_LINKED and not (root / entry.name).exists():
            (root / entry.name).symlink_to(entry)
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "samples").symlink_to(REPO / "data" / "samples")
    with open(root / "data" / "my_dialogues.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["conversation", "notes"])
        writer.writerows([r["dialogue"], r["summary"]] for r in dialogue_rows())
    return root


def shell_env(root: Path, bin_dir: Path) -> dict:
    """The environment of a pasted block: offline, FTF_ROOT = the project, `python` = this Python."""
    from conftest import OFFLINE_ENV
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(root), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FTF_API_TOKEN", None)
    return env


def substitute(text: str, models: dict[str, Path], port: int) -> str:
    for model_id, kind in MODEL_IDS.items():
        text = text.replace(model_id, str(models[kind]))
    for host in ("localhost", "127.0.0.1"):
        text = text.replace(f"{host}:{DOC_PORT}", f"{host}:{port}")
    return text.replace(f"--port={DOC_PORT}", f"--port={port}")


def script_for(file_blocks: list[Block], models: dict[str, Path], port: int) -> str:
    """One bash script: each unmarked shell block in order, a marker line before each."""
    parts = ["set -eo pipefail", "trap 'set +e; kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT"]
    for block in file_blocks:
        if block.lang not in SHELL_LANGS:
            continue
        if block.mark:
            parts.append(f"echo '[doc-test] {block.where}: {block.mark}'")
            continue
        parts += [f"echo \"[doc-test] {block.where} (at $SECONDS s)\" >&2", substitute(block.text, models, port)]
    return "\n".join(parts) + "\n"


def run_shell(script: str, root: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    """Run `script` in bash from `root`; on a timeout the whole process group is stopped."""
    proc = subprocess.Popen(["bash", "-c", script], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[doc-test] timed out after {timeout} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # anything a block left running
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
