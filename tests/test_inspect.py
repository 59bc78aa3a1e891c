"""inspect_dataset.py run as a user runs it."""
from __future__ import annotations

import json

import pytest

from conftest import SAMPLES, SHARED_DATA, error_line, files_under, needs_shared_data, run_stage

OUTPUTS = {"metrics/dataset_overview.json", "metrics/dataset_lengths.png", "metrics/inspect_dataset.run_config.json"}


def test_samples_with_tokenizer_and_export(project, tiny_models):
    result = run_stage("inspect_dataset.py", f"--dataset={SAMPLES}", f"--model_name={tiny_models['bart']}",
                       "--max_input_length=512", "--export_jsonl=data/train_subset.jsonl", "--n_samples=10",
                       root=project)
    assert files_under(project) == OUTPUTS | {"data/train_subset.jsonl", "data/train_subset.jsonl.run_config.json"}
    overview = json.loads((project / "metrics/dataset_overview.json").read_text())
    assert overview["total_rows"] == 36 and overview["splits_made_from_single_file"]
    assert sum(overview["rows"].values()) == 36
    assert overview["lengths"]["dialogue"]["tokens"]["max"] > 1024
    assert overview["truncation"]["dialogues_over_limit"] >= 1
    assert 0 < overview["truncation"]["dialogues_over_limit_share"] < 0.2
    exported = [json.loads(line) for line in (project / "data/train_subset.jsonl").read_text().splitlines()]
    assert len(exported) == 10 and set(exported[0]) == {"id", "dialogue", "summary"}
    assert "exceed MAX_INPUT_LENGTH=512 tokens" in result.stdout
    run_config = json.loads((project / "metrics/inspect_dataset.run_config.json").read_text())
    # the bundled samples lie outside this FTF_ROOT: the record names them absolute (portable())
    assert run_config["config"]["N_SAMPLES"] == 10 and str(SAMPLES) in run_config["inputs"]
    # A re-run with the same settings gives the same subset.
    first = (project / "data/train_subset.jsonl").read_text()
    run_stage("inspect_dataset.py", f"--dataset={SAMPLES}", "--model_name=", "--export_jsonl=data/train_subset.jsonl",
              "--n_samples=10", root=project)
    assert (project / "data/train_subset.jsonl").read_text() == first


def test_without_tokenizer_says_why(project):
    result = run_stage("inspect_dataset.py", f"--dataset={SAMPLES}", "--model_name=no/such-model-offline", root=project)
    assert "token statistics skipped" in result.stdout
    overview = json.loads((project / "metrics/dataset_overview.json").read_text())
    assert overview["truncation"] is None and overview["tokenizer_note"]


@needs_shared_data
def test_dialogsum_dev500(project):
    run_stage("inspect_dataset.py", f"--dataset={SHARED_DATA / 'dialogsum_dev500.jsonl'}", "--model_name=",
              root=project)
    overview = json.loads((project / "metrics/dataset_overview.json").read_text())
    assert overview["total_rows"] == 500
    assert overview["rows"] == {"train": 400, "validation": 50, "test": 50}


def test_missing_column_fails_with_one_line_and_writes_nothing(project):
    rows = [json.loads(line) for line in SAMPLES.read_text().splitlines()]
    bad = project / "renamed.jsonl"
    bad.write_text("".join(json.dumps({"id": r["id"], "dialogue": r["dialogue"], "abstract": r["summary"]}) + "\n"
                           for r in rows))
    result = run_stage("inspect_dataset.py", f"--dataset={bad}", "--model_name=", root=project, check=False)
    assert result.returncode != 0
    assert error_line(result) == ("error: no summary column found (tried summary, highlights, target, human_summary, "
                                  "reference, output); columns found: id, dialogue, abstract; set "
                                  "--SUMMARY_COLUMN=<name>")
    assert files_under(project) == {"renamed.jsonl"}


@pytest.mark.parametrize("args,message", [
    (["--no_such_flag=1"], "error: unknown setting --no_such_flag"),
    (["--n_sample=3"], "did you mean --N_SAMPLES?"),
    (["--dataset=missing.jsonl"], "is neither a local file/folder"),
])
def test_bad_flags(project, args, message):
    result = run_stage("inspect_dataset.py", *args, root=project, check=False)
    assert result.returncode == 2 and message in error_line(result)


def test_help(project):
    result = run_stage("inspect_dataset.py", "--help", root=project)
    assert "Run as:" in result.stdout and "--MAX_INPUT_LENGTH=768" in result.stdout
    assert files_under(project) == set()
