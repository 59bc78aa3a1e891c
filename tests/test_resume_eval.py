"""Resumable evaluation (issue 25, item 3): eval_bart_lora.py killed after batch k (a real
os._exit right after the part file's append, FTF_EVAL_EXIT_AFTER_BATCH) continues after its last
complete batch when the same command runs again, loses at most one batch, and writes the CSV an
uninterrupted run writes, byte for byte; a part file of another run is refused with one line."""
from __future__ import annotations

import json

import pytest

from conftest import SAMPLES, error_line, files_under, run_stage

from finetuneflow.quality.eval_parts import read_lines

EVAL = "eval_bart_lora.py"
KILLED = 75                      # eval_parts.py's exit status at a test kill point
ROWS, BATCH = 7, 2               # 4 batches, the last one short
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def settings(model, tag, *more):
    return [f"--model={model}", f"--tag={tag}", f"--dataset={SAMPLES}", "--split=all", f"--n_samples={ROWS}",
            f"--batch_size={BATCH}", "--wandb=False", *more]


def evaluate(project, model, tag, *more, kill_after: int | None = None, check=True):
    env = {**ONE_THREAD, **({"FTF_EVAL_EXIT_AFTER_BATCH": str(kill_after)} if kill_after else {})}
    return run_stage(EVAL, *settings(model, tag, *more), root=project, env=env, check=check)


def part(project, tag):
    return project / "metrics" / f"{tag}_predictions.part-0.jsonl"


def killed(project, model, tag, k, *more):
    """A run killed right after its k-th batch: no CSV, no eval json, a part file of k batches."""
    result = evaluate(project, model, tag, *more, kill_after=k, check=False)
    assert result.returncode == KILLED, result.stderr[-2000:]
    assert not (project / "metrics" / f"{tag}_predictions.csv").exists()
    assert not (project / "metrics" / f"{tag}_eval.json").exists()
    lines, _ = read_lines(part(project, tag))
    assert [line["batch"] for line in lines[1:]] == list(range(k))


def finished(project, tag) -> dict:
    record = json.loads((project / "metrics" / f"{tag}_eval.json").read_text())
    assert not part(project, tag).exists()                       # the part file goes once the CSV is written
    return record


@pytest.fixture(scope="module")
def reference(tiny_models, tmp_path_factory):
    """An uninterrupted run's CSV (and its project)."""
    project = tmp_path_factory.mktemp("uninterrupted")
    evaluate(project, tiny_models["bart"], "full")
    assert finished(project, "full")["resumed_batches"] == 0
    return (project / "metrics" / "full_predictions.csv").read_bytes()


def test_a_killed_run_continues_after_its_last_batch_and_writes_the_same_csv(tiny_models, project, reference):
    model = tiny_models["bart"]
    killed(project, model, "lora", 2)
    evaluate(project, model, "lora")
    assert (project / "metrics" / "lora_predictions.csv").read_bytes() == reference
    assert finished(project, "lora")["resumed_batches"] == 2       # no finished batch was generated again
    assert files_under(project / "metrics") == {"lora_predictions.csv", "lora_eval.json", "lora_run_config.json"}


@pytest.mark.slow
def test_a_torn_last_line_is_dropped_and_its_batch_done_again(tiny_models, project, reference):
    model = tiny_models["bart"]
    killed(project, model, "lora", 2)
    path = part(project, "lora")
    whole = path.read_bytes()
    last = whole[:-1].rsplit(b"\n", 1)[1]
    path.write_bytes(whole[:-len(last) - 1] + last[: len(last) // 2])    # died while writing batch 1's line
    evaluate(project, model, "lora")
    assert (project / "metrics" / "lora_predictions.csv").read_bytes() == reference
    assert finished(project, "lora")["resumed_batches"] == 1               # lost: the torn batch only


@pytest.mark.slow
def test_a_part_file_of_another_run_is_refused_with_one_line(tiny_models, project):
    model = tiny_models["bart"]
    killed(project, model, "lora", 1)
    before = part(project, "lora").read_bytes()
    result = evaluate(project, model, "lora", "--num_beams=2", check=False)
    assert result.returncode == 2
    line = error_line(result)
    assert "lora_predictions.part-0.jsonl" in line and "--OVERWRITE=True" in line and "another evaluation" in line
    assert part(project, "lora").read_bytes() == before                 # nothing of it touched
    assert not (project / "metrics" / "lora_predictions.csv").exists()
    evaluate(project, model, "lora", "--num_beams=2", "--overwrite=True")
    assert finished(project, "lora")["resumed_batches"] == 0


@pytest.mark.slow
def test_every_kill_point_resumes_to_the_same_csv(tiny_models, project, reference):
    """Killed after batch 1, again after batch 3 (the resumed run's), then finished; and killed after
    the last batch (everything generated, nothing written yet)."""
    model = tiny_models["bart"]
    killed(project, model, "chain", 1)
    killed(project, model, "chain", 3)
    evaluate(project, model, "chain")
    assert (project / "metrics" / "chain_predictions.csv").read_bytes() == reference
    assert finished(project, "chain")["resumed_batches"] == 3
    killed(project, model, "last", 4)
    evaluate(project, model, "last")
    assert (project / "metrics" / "last_predictions.csv").read_bytes() == reference
    assert finished(project, "last")["resumed_batches"] == 4


def test_read_lines_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "x.part-0.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c":')
    assert read_lines(path) == ([{"a": 1}, {"b": 2}], 18)
    path.write_bytes(b'{"a": 1}\n{"b": 2\n')                # a complete but damaged last line: dropped too
    assert read_lines(path) == ([{"a": 1}], 9)
    path.write_bytes(b'{"a": 1}\nnot json\n{"c": 3}\n')    # damage before the last line: refused
    from finetuneflow.contract.errors import UserError
    with pytest.raises(UserError, match="damaged"):
        read_lines(path)


def launch(project, model, tag, processes=2, kill_after=None):
    """`accelerate launch --multi_gpu --num_processes N eval_bart_lora.py ...` on CPU processes (gloo)."""
    import os
    import subprocess
    import sys

    from conftest import OFFLINE_ENV, REPO
    from test_sharded import free_port
    env = {**os.environ, **OFFLINE_ENV, **ONE_THREAD, "FTF_ROOT": str(project), "CUDA_VISIBLE_DEVICES": "",
           **({"FTF_EVAL_EXIT_AFTER_BATCH": str(kill_after)} if kill_after else {})}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(REPO / EVAL), *settings(model, tag)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.e2e
def test_a_killed_sharded_run_resumes_each_processs_part(tiny_models, project, reference):
    """Two processes, each killed after its first batch (its own part file), then the same launch:
    one CSV equal to the one-process run's; a one-process run over the parts of two is refused."""
    model = tiny_models["bart"]
    assert launch(project, model, "sharded", kill_after=1).returncode != 0
    parts = {p.name for p in (project / "metrics").glob("sharded_predictions.part-*.jsonl")}
    # the main process's part holds its first batch; the launcher may stop the other before it has one
    assert "sharded_predictions.part-0.jsonl" in parts <= {f"sharded_predictions.part-{r}.jsonl" for r in (0, 1)}
    refused = evaluate(project, model, "sharded", check=False)
    assert refused.returncode == 2 and "a run in 2 processes (this one runs 1)" in error_line(refused)
    result = launch(project, model, "sharded")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (project / "metrics" / "sharded_predictions.csv").read_bytes() == reference
    assert finished(project, "sharded")["resumed_batches"] == 1      # the main process's; the other's too, unseen
    assert not list((project / "metrics").glob("*.part-*"))
