"""Two "machines" on one box (issue 25): `accelerate launch --num_machines 2 --machine_rank 0|1
--main_process_ip 127.0.0.1`, one CPU process each over gloo, as docs/recipes.md's "more than one
machine" commands run on two nodes. A sharded evaluation writes the one predictions CSV a single
process writes, byte for byte; machines started with other settings stop with one line each."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import OFFLINE_ENV, REPO, SAMPLES, files_under, run_stage
from test_sharded import free_port

SETTINGS = [f"--dataset={SAMPLES}", "--split=all", "--n_samples=7", "--batch_size=2", "--max_new_tokens=10",
            "--wandb=False"]


def two_machines(project, script: str, args0: list[str], args1: list[str]) -> list[subprocess.CompletedProcess]:
    """The recipe's two commands (machine 0 and machine 1), started together on 127.0.0.1."""
    env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(project), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    running = []
    for rank, args in enumerate((args0, args1)):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                   "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(REPO / script), *args]
        running.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
    results = []
    for process in running:
        out, err = process.communicate(timeout=900)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


@pytest.mark.slow
@pytest.mark.e2e
def test_two_machines_write_the_csv_one_process_writes(tiny_models, project):
    model = f"--model={tiny_models['bart']}"
    run_stage("eval_bart_lora.py", model, *SETTINGS, "--tag=one", root=project, env={"OMP_NUM_THREADS": "1"})
    args = [model, *SETTINGS, "--tag=two"]
    results = two_machines(project, "eval_bart_lora.py", args, args)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    metrics = project / "metrics"
    assert (metrics / "two_predictions.csv").read_bytes() == (metrics / "one_predictions.csv").read_bytes()
    assert files_under(metrics) == {f"{tag}_{kind}" for tag in ("one", "two")
                                    for kind in ("predictions.csv", "eval.json", "run_config.json")}
    assert "2 processes" in results[0].stdout and "ROUGE-1" not in results[1].stdout   # machine 0 reports


@pytest.mark.slow
@pytest.mark.e2e
def test_machines_with_other_settings_stop_with_one_line_each(tiny_models, project):
    model = f"--model={tiny_models['bart']}"
    results = two_machines(project, "eval_bart_lora.py", [model, *SETTINGS, "--tag=two"],
                           [model, *SETTINGS, "--tag=two", "--num_beams=2"])
    for result in results:
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert lines == [lines[0]] and "process 1 of 2 runs other settings" in lines[0], result.stderr[-2000:]
    assert not (project / "metrics" / "two_predictions.csv").exists()
