"""scripts/gpu_check.py: on a machine without CUDA it refuses with one line; --dry-run runs every
check (QLoRA, bf16 LoRA, engine vs seed loop, merge parity, OOM halving, CT2) wired the same way
on the CPU with a tiny model and writes gpu_check.json + a markdown table."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import SAMPLES, error_line, run_stage

SCRIPT = "scripts/gpu_check.py"
CHECKS = ["qlora", "bf16_lora", "engine", "merge", "oom", "ct2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    result = run_stage(SCRIPT, f"--output_dir={tmp_path / 'out'}", root=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_line(result).startswith("error: no GPU: torch sees no CUDA device")
    assert "--dry-run" in error_line(result) and not (tmp_path / "out").exists()


def test_the_dry_run_wires_every_check_on_the_cpu(tmp_path):
    out = tmp_path / "check"
    result = run_stage(SCRIPT, "--dry-run", f"--output_dir={out}", f"--dataset={SAMPLES}", "--train_steps=6",
                       "--generate_rows=12", "--generate_tokens=8", "--oom_batch=24", root=tmp_path, timeout=900)
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] and report["environment"]["dry_run"] and list(report["results"]) == CHECKS
    results = report["results"]
    assert results["qlora"]["precision"].startswith("4-bit") and results["qlora"]["steps"] == 6
    assert results["engine"]["rows"] == 12 and results["engine"]["identical"] == 12
    assert results["oom"]["simulated"] and results["oom"]["final_batch"] < 24          # the batch was halved
    assert results["merge"]["float32"]["passed"] and results["merge"]["float32"]["max_logit_diff"] < 1e-3
    assert results["ct2"]["passed"] and results["ct2"]["summaries_identical"] == "4/4"
    table = (out / "gpu_check.md").read_text()
    assert "DRY RUN" in table and table.count("| PASS |") == len(CHECKS) and "| check | result |" in table
    assert "gpu_check.md" in result.stdout
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    refused = run_stage(SCRIPT, "--dry-run", f"--output_dir={tmp_path / 'mine'}", root=tmp_path, check=False)
    assert refused.returncode == 2 and "already holds files that gpu_check did not write" in error_line(refused)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
