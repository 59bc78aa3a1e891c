"""Hostile input against the settings contract (every stage) and the stages that read data and
write reports (inspect_dataset, eval_bart_lora, eval_metrics_bart_lora): every attack ends in one
`error:` line, exit code 2, and the user's files are untouched."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, SAMPLES, error_line, run_stage
from hostile import assert_refused, snapshot, user_project

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.settings import declared_settings

STAGES = sorted(p.stem for p in REPO.glob("*.py"))


def stage_module(name: str):
    sys.path.insert(0, str(REPO))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO))


def bad_values(setting) -> list[str]:
    """Values the setting's spec must refuse: out of range, non-finite, wrong type, unknown choice."""
    values = []
    for alt in setting.spec.alternatives:
        for op, limit in alt.bounds:
            step = 1 if alt.kind == "int" else 1e-3
            values.append(str(int(limit) - 1 if alt.kind == "int" and op == ">=" else
                              int(limit) + 1 if alt.kind == "int" and op == "<=" else
                              limit if op in (">", "<") else limit - step if op == ">=" else limit + step))
        if alt.kind == "float":
            values += ["nan", "1e999"]
        if alt.kind == "bool":
            values.append("maybe")
    if setting.spec.choices and all(a.kind in ("choice", "none") for a in setting.spec.alternatives):
        values.append("no-such-choice")
    return values


CASES = [(stage, s.name, value) for stage in STAGES
         for s in declared_settings({"__file__": str(REPO / f"{stage}.py")}) for value in bad_values(s)]


def test_every_stage_declares_a_spec_for_every_setting_it_cannot_infer():
    assert len(CASES) > 150, "the matrix below should cover every bounded setting of every stage"


@pytest.mark.parametrize("stage,name,value", CASES, ids=[f"{s}-{n}={v}" for s, n, v in CASES])
def test_bad_numbers_and_choices_are_refused_before_any_work(stage, name, value):
    module = stage_module(stage)
    with pytest.raises(UserError) as info:
        module.main([f"--{name.lower()}={value}"])
    assert f"--{name}={value}" in str(info.value)


@pytest.mark.parametrize("stage", ["train_bart_lora", "eval_bart_lora", "serve_api", "export_gguf"])
def test_a_bad_setting_is_one_line_and_exit_2_as_a_user_sees_it(stage, project):
    result = run_stage(f"{stage}.py", "--batch_size=0", root=project, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--BATCH_SIZE=0: out of range: must be int >= 1" in error_line(result)


# ----------------------------------------------------------------------------- data files

def _data_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps({"dialogue": "Jos\u00e9: ol\u00e1", "summary": "ok"}).encode("latin-1")
                      .replace(b"\\u00e9", b"\xe9") + b"\n" + b'{"dialogue": "caf\xe9", "summary": "x"}\n')
    garbled = tmp_path / "garbled.jsonl"
    garbled.write_text('{"dialogue": "A: hi", "summary": "hi"}\n{not json\n')
    folder = tmp_path / "no_data"
    folder.mkdir()
    (folder / "notes.txt").write_text("not data")
    missing = tmp_path / "renamed.jsonl"
    missing.write_text(json.dumps({"id": "1", "text_of_chat": "A: hi", "summary": "hi"}) + "\n")
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"dialogue": "A: hi \\ud83d\\ude00", "summary": "a valid pair"}\n'
                         '{"dialogue": "A: hi", "summary": "lone \\ud800 surrogate"}\n')
    unbalanced = tmp_path / "unbalanced.csv"
    unbalanced.write_text('dialogue,summary\n"A: hi\nB: hello",greeting\n"A: lunch?,asks\n"B: yes",agrees\n')
    return {"empty file": (empty, "empty.jsonl"), "not UTF-8": (latin, "latin1.jsonl"),
            "garbled JSON lines": (garbled, "garbled.jsonl"), "folder without data": (folder, "no readable data file"),
            "no dialogue column": (missing, "no dialogue column found"),
            "lone surrogate": (surrogate, "surrogate.jsonl line 2: holds a lone UTF-16 surrogate (U+D800)"),
            "unbalanced CSV quote": (unbalanced, "unbalanced.csv: the row starting at line 4 is not valid CSV")}


@pytest.mark.parametrize("case", ["empty file", "not UTF-8", "garbled JSON lines", "folder without data",
                                  "no dialogue column", "lone surrogate", "unbalanced CSV quote"])
@pytest.mark.parametrize("stage", ["inspect_dataset.py", "eval_bart_lora.py"])
def test_bad_data_files_are_one_line(stage, case, tmp_path, tiny_models):
    project = user_project(tmp_path)
    path, message = _data_files(tmp_path)[case]
    before = snapshot(project.root)
    extra = [f"--model={tiny_models['llama']}"] if stage == "eval_bart_lora.py" else ["--model="]
    result = run_stage(stage, f"--dataset={path}", *extra, root=project.root, check=False)
    assert_refused(result, message, before, project.root)


@pytest.mark.parametrize("stage", ["inspect_dataset.py", "train_bart_lora.py", "eval_bart_lora.py"])
def test_an_unreachable_hub_dataset_is_one_line(stage, tmp_path, tiny_models):
    """Offline (or a typo'd id): no ConnectionError traceback, one line naming the dataset and the fixes."""
    project = user_project(tmp_path)
    before = snapshot(project.root)
    result = run_stage(stage, "--dataset=nobody/no-such-dialogues", f"--model={tiny_models['bart']}",
                       root=project.root, check=False)
    line = assert_refused(result, "dataset 'nobody/no-such-dialogues' is not a local file or folder", before,
                          project.root)
    assert "HF_HUB_OFFLINE" in line and "use a local file instead" in line


# ----------------------------------------------------------------------------- outputs

def test_inspect_never_overwrites_its_own_dataset_or_a_users_file(tmp_path):
    project = user_project(tmp_path)
    before = snapshot(project.root)
    for target, message in ((project.data, "is an input of this run"),
                            (project.notes / "todo.txt", "exists and was not written by inspect_dataset"),
                            (project.notes, "is a folder; give a file name"),
                            (project.root / ".git" / "config", "is inside a .git folder")):
        result = run_stage("inspect_dataset.py", f"--dataset={project.data}", "--model=",
                           f"--export_jsonl={target}", root=project.root, check=False)
        assert_refused(result, message, before, project.root)
    result = run_stage("inspect_dataset.py", f"--dataset={project.data}", "--model=", f"--output_dir={project.data}",
                       root=project.root, check=False)
    assert_refused(result, "is a file, not a folder", before, project.root)


def test_eval_outputs_are_checked_before_the_model_loads(tmp_path, tiny_models):
    project = user_project(tmp_path)
    (project.notes / "baseline_predictions.csv").write_text("id,prediction\n1,mine\n")
    before = snapshot(project.root)
    common = [f"--model={tiny_models['llama']}", f"--dataset={project.data}", "--split=test"]
    for args, message in ((["--tag=../../x"], "--tag='../../x' must be a file-name-safe word"),
                          ([f"--output_dir={project.notes}", "--tag=baseline"], "exists and was not written by eval"),
                          ([f"--output_dir={project.data}"], "is a file, not a folder"),
                          ([f"--output_dir={project.root / '.git'}"], "is inside a .git folder")):
        result = run_stage("eval_bart_lora.py", *common, *args, root=project.root, check=False)
        assert_refused(result, message, before, project.root)


def test_eval_refuses_training_rows_and_flags_them_when_allowed(tmp_path, tiny_models):
    from adapters import make_adapter
    project = user_project(tmp_path)
    adapter = make_adapter(tiny_models["llama"], project.root / "ft_outputs" / "lora")
    record = json.loads((adapter / "run_config.json").read_text())
    from finetuneflow.contract.record import fingerprint
    rows = [json.loads(line) for line in SAMPLES.read_text().splitlines()]
    record["split"]["train_fingerprints"] = [fingerprint(r["dialogue"]) for r in rows[:5]]
    (adapter / "run_config.json").write_text(json.dumps(record))
    common = [f"--model={adapter}", f"--dataset={SAMPLES}", "--split=all", "--n_samples=6", "--max_new_tokens=4",
              "--val_fraction=0", "--test_fraction=0"]
    refused = run_stage("eval_bart_lora.py", *common, root=project.root, check=False)
    assert_refused(refused, "5 of 6 all rows")
    assert "--ALLOW_OVERLAP=True" in error_line(refused)
    allowed = run_stage("eval_bart_lora.py", *common, "--allow_overlap=True", root=project.root)
    assert "WARNING: 5 of these rows were training rows" in allowed.stdout
    eval_record = json.loads((project.root / "metrics" / "lora_eval.json").read_text())
    assert eval_record["training_overlap"]["rows"] == 5 and eval_record["dataset"]["split"] == "all"


def test_eval_metrics_names_cannot_escape_the_output_folder(tmp_path):
    project = user_project(tmp_path)
    predictions = project.root / "a_predictions.csv"
    predictions.write_text("id,reference,prediction\n1,They meet.,They meet.\n")
    before = snapshot(project.root)
    for names, message in (("../../x", "version name '../../x' is not a safe file name"),
                           ("/etc/passwd", "is not a safe file name"), (".hidden", "is not a safe file name")):
        result = run_stage("eval_metrics_bart_lora.py", f"--predictions={predictions}", f"--names={names}",
                           "--bertscore_model=", root=project.root, check=False)
        assert_refused(result, message, before, project.root)
    result = run_stage("eval_metrics_bart_lora.py", f"--predictions={predictions}", "--bertscore_model=",
                       f"--output_dir={project.notes}", root=project.root, check=False)
    assert result.returncode == 0   # new files beside the user's own are fine; theirs are untouched
    assert (project.notes / "todo.txt").read_text() == "my own work\n"


# ----------------------------------------------------------------------------- a summary holding "\r"

def _bart_that_writes_carriage_returns(tiny_bart: Path, out: Path) -> Path:
    """A copy of the tiny BART whose summaries alternate " the" and a bare "\\r": every other token is
    suppressed, and a bias on each pair makes one always follow the other (whatever the random weights)."""
    import shutil
    from transformers import AutoTokenizer
    shutil.copytree(tiny_bart, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    cr, the = tokenizer.convert_tokens_to_ids(["\u010d", "\u0120the"])   # byte-level BPE spelling of "\r" and " the"
    assert tokenizer.decode([the, cr, the]) == " the\r the"
    config = json.loads((out / "generation_config.json").read_text())
    special = {config["bos_token_id"], config["eos_token_id"]}
    config.update(suppress_tokens=sorted(set(range(len(tokenizer))) - special - {cr, the}),
                  sequence_bias=[[[i], -100.0] for i in sorted(special)] + [[[the, cr], 50.0], [[cr, the], 50.0]])
    (out / "generation_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.slow
def test_a_summary_holding_a_carriage_return_reads_back_exactly(tmp_path, tiny_models):
    """A model that writes "\\r" inside a summary: the predictions CSV keeps it inside its field, so the
    comparison reads every row back with the exact text (it used to split the row: "duplicate ids")."""
    import csv
    import pandas as pd
    project = user_project(tmp_path)
    model = _bart_that_writes_carriage_returns(tiny_models["bart"], tmp_path / "cr-bart")
    run_stage("eval_bart_lora.py", f"--model={model}", f"--dataset={project.data}", "--split=test", "--n_samples=4",
              "--num_beams=1", "--max_new_tokens=9", "--no_repeat_ngram_size=0", "--tag=cr", root=project.root)
    path = project.root / "metrics" / "cr_predictions.csv"
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and all("\r the" in r["prediction"] or "the\r" in r["prediction"] for r in rows), rows
    run_stage("eval_metrics_bart_lora.py", f"--predictions={path}", "--bertscore_model=", "--faithfulness=False",
              "--bootstrap_samples=50", root=project.root)
    scored = pd.read_csv(project.root / "metrics" / "cr_metrics.csv", dtype=str, keep_default_na=False)
    assert scored["prediction"].tolist() == [r["prediction"] for r in rows]
# ----------------------------------------------------------------------------- decoding (eval)

DECODING_CASES = {
    "mbr with beams": (["--decoding=mbr", "--num_beams=4"], "DECODING=mbr decodes with one beam, but NUM_BEAMS=4"),
    "no samples": (["--decoding=mbr", "--mbr_samples=0"], "--MBR_SAMPLES=0: out of range: must be int >= 1"),
    "beam with one beam": (["--decoding=beam", "--num_beams=1"], "DECODING=beam needs NUM_BEAMS >= 2"),
    "an mbr knob without mbr": (["--mbr_samples=3"], "MBR_SAMPLES=3 only applies to DECODING=mbr"),
    "no such decoding": (["--decoding=sampling"], "--DECODING=sampling"),
    "beam on llama.cpp": (["--decoding=beam", "--num_beams=4", "--model=GGUF"],
                          "DECODING=beam: the llama.cpp backend has no beam search"),
    "one reference column": (["--reference_columns=summary"], "REFERENCE_COLUMNS=summary names one column"),
    "a missing reference column": (["--reference_columns=summary,summary9"], "no column 'summary9'"),
}


@pytest.mark.parametrize("case", list(DECODING_CASES))
def test_contradicting_decoding_is_refused_before_anything_is_written(case, tmp_path, tiny_models):
    """`--decoding=mbr --num_beams=4`, `--mbr_samples=0`, beams on a backend without them, ...: one
    line, exit 2, no file written (the llama.cpp case never loads the file: the plan asks the
    backend that would run it)."""
    project = user_project(tmp_path)
    args, message = DECODING_CASES[case]
    gguf = project.root / "models" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + b"\0" * 64)      # detected as llama.cpp's; refused before it is read
    model = f"--model={gguf}" if "--model=GGUF" in args else f"--model={tiny_models['llama']}"
    before = snapshot(project.root)
    result = run_stage("eval_bart_lora.py", model, *[a for a in args if a != "--model=GGUF"],
                       f"--dataset={project.data}", "--split=all", "--n_samples=2", root=project.root, check=False)
    assert_refused(result, message, before, project.root)
    assert not (project.root / "metrics").exists()
