"""Shared pieces of the hostile-input suite (tests/test_hostile_*.py): a project that looks like a
user's (a git repository with their files), the output locations an attacker or a typo would
pick, and one assertion that a stage refused cleanly and destroyed nothing.

    project = user_project(tmp_path)               # FTF_ROOT with .git, data, a model folder
    before = snapshot(project.root)
    result = run_stage("post_merge_cleanup.py", f"--model={m}", "--output_dir=.", root=project.root, check=False)
    assert_refused(result, "is the project root", before)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from conftest import SAMPLES, error_line


@dataclass
class UserProject:
    root: Path            # FTF_ROOT: a git repository with the user's own files
    data: Path            # a dataset file the user owns
    notes: Path           # an unrelated folder of the user's files


def user_project(tmp_path: Path) -> UserProject:
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    data = root / "data" / "dialogues.jsonl"
    shutil.copy(SAMPLES, data)
    notes = root / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my own work\n")
    (root / "README.md").write_text("the user's project\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    return UserProject(root, data, notes)


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the .git folder included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_refused(result: subprocess.CompletedProcess, message: str, before: dict[str, str] | None = None,
                   folder: Path | None = None) -> str:
    """Exit code 2, exactly one `error:` line containing `message`, no traceback, and every file
    that was under `folder` before is still there, unchanged."""
    assert result.returncode == 2, \
        f"exit {result.returncode}\nstdout:{result.stdout[-1500:]}\nstderr:{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    line = error_line(result)
    assert message in line, line
    if before is not None:
        after = snapshot(folder)
        lost = {k for k in before if before[k] != after.get(k)}
        assert not lost, f"changed or deleted: {sorted(lost)[:10]}"
    return line


def protected_outputs(project: UserProject, inputs: list[Path]) -> dict[str, tuple[str, str]]:
    """{case: (value for an output setting, expected message part)} for every place a stage must
    never write: the project root, a folder above it, the repository itself, an input, the
    folder holding an input, and a folder of the user's files."""
    cases = {"project root": (".", "is the project root"),
             "folder above the root": (str(project.root.parent), "is the project root or a folder above it"),
             "user's folder": (str(project.notes), "already holds files that")}
    for i, item in enumerate(inputs):
        cases[f"input {i}"] = (str(item), "is an input of this run")
        cases[f"folder holding input {i}"] = (str(item.parent), "contains an input of this run")
    return cases


def unwritable(folder: Path) -> Path:
    """A folder this process cannot write into (skips the caller when running as root, where
    permissions do not stop writes)."""
    import pytest
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o500)
    if os.access(folder, os.W_OK):
        folder.chmod(0o700)
        pytest.skip("running as root: permissions do not stop writes here")
    return folder
