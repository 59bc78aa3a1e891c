"""Hostile input for the plan stages, benchmark_models.py and recommend_finetune.py, by attack class:

* protected outputs: OUTPUT_DIR at the project root, above it, in a .git folder, an input, the
  folder holding an input, a folder of the user's files, an existing file, an unwritable place;
* foreign files in the shared output folder (only a stage's own, listed, unchanged files are ever
  replaced or removed);
* corrupt inputs: missing, empty, binary, non-UTF-8 or foreign rankings, overviews and data files,
  bad MODELS entries, a TRAINER that is not a stage script;
* bad numeric settings and contradictory settings;
* command injection through the ranking (model names and sources), DATASET, GPU_NAME and
  TRAINER into the generated `train_<model>.sh`: each script passes `bash -n`, and run for real
  against stub `accelerate` and trainer it creates no marker file and hands the trainer exactly
  the planned values;
* path traversal in names: script and prediction files stay inside OUTPUT_DIR.

Every refusal is ONE `error:` line, exit code 2, and the user's files unchanged."""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_stage
from finetuneflow.contract.errors import UserError
from hostile import UserProject, assert_refused, protected_outputs, snapshot, unwritable, user_project

HEADER = ["rank", "model", "kind", "status", "rougeL", "composite", "samples_per_s", "parameters", "family",
          "model_type", "hidden_size", "encoder_layers", "decoder_layers", "vocab_size", "device", "source"]


def ranking_row(model: str, source: str, composite: float = 0.5) -> list[str]:
    """A small decoder-only model row (planned from these columns: its config cannot be loaded)."""
    return ["1", model, "model", "ok", "20.0", str(composite), "5.0", "120000000", "causal", "llama", "768", "0", "12",
            "32000", "Tesla T4", source]


def write_ranking(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


# ----------------------------------------------------------------------------- the two stages
class Benchmark:
    script = "benchmark_models.py"

    def __init__(self, project: UserProject):
        self.project = project
        self.model = project.root / "models" / "my-model"    # a local model entry (never run: refused first)
        self.model.mkdir(parents=True)
        (self.model / "config.json").write_text("{}")
        self.inputs = [project.data, self.model]

    def args(self, *extra: str) -> list[str]:
        return [f"--models=lead-3,{self.model}", f"--dataset={self.project.data}", "--split=all", "--n_samples=3",
                "--bertscore_model=", *extra]


class Recommend:
    script = "recommend_finetune.py"

    def __init__(self, project: UserProject):
        self.project = project
        self.model = project.root / "models" / "my-model"
        self.model.mkdir(parents=True)
        self.trainer = project.root / "trainers" / "train_stub.py"
        self.trainer.parent.mkdir()
        self.trainer.write_text(trainer_stub_source())
        self.ranking = write_ranking(project.root / "rankings" / "final_ranking.csv",
                                     [ranking_row("my-model", str(self.model))])
        self.inputs = [self.trainer, self.model]   # the ranking's own folder is shared by design

    def args(self, *extra: str) -> list[str]:
        return [f"--ranking={self.ranking}", "--overview=", "--gpu_name=T4", f"--trainer={self.trainer}", *extra]


STAGES = {"benchmark": Benchmark, "recommend": Recommend}


def trainer_stub_source() -> str:
    """The real trainer's settings block (so its specs judge the plan) over a body that records
    the arguments it receives in $STUB_OUT."""
    source = (REPO / "train_bart_lora.py").read_text(encoding="utf-8")
    block = source[:re.search(r"^(import|from) ", source, re.M).start()]
    return block + ("import json, os, sys\n"
                    "with open(os.environ['STUB_OUT'], 'w', encoding='utf-8') as handle:\n"
                    "    json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, handle)\n")


@pytest.fixture(params=sorted(STAGES))
def stage(request, tmp_path):
    return STAGES[request.param](user_project(tmp_path))


# ----------------------------------------------------------------------------- protected outputs
def protected_cases(stage) -> dict[str, tuple[str, str]]:
    project = stage.project
    cases = protected_outputs(project, stage.inputs)
    (project.root / ".git" / "hooks").mkdir(parents=True, exist_ok=True)
    cases.update({".git folder": (str(project.root / ".git"), "is inside a .git folder"),
                  "inside .git": (str(project.root / ".git" / "hooks" / "out"), "is inside a .git folder"),
                  "an existing file": (str(project.root / "README.md"), "is a file, not a folder"),
                  "under a file": (str(project.root / "README.md" / "out"), "is a file, not a folder")})
    return cases


CASES = ["project root", "folder above the root", "user's folder", "input 0", "folder holding input 0", "input 1",
         "folder holding input 1", ".git folder", "inside .git", "an existing file", "under a file"]


@pytest.mark.parametrize("case", CASES)
def test_protected_outputs_are_refused(stage, case):
    value, message = protected_cases(stage)[case]
    before = snapshot(stage.project.root)
    result = run_stage(stage.script, *stage.args(f"--output_dir={value}"), root=stage.project.root, check=False)
    assert_refused(result, message, before, stage.project.root)


def test_unwritable_output_is_one_line(stage):
    locked = unwritable(stage.project.root / "locked")
    before = snapshot(stage.project.root)
    result = run_stage(stage.script, *stage.args(f"--output_dir={locked / 'out'}"), root=stage.project.root,
                       check=False)
    locked.chmod(0o700)
    assert_refused(result, "is not writable", before, stage.project.root)


# ----------------------------------------------------------------------------- foreign files in the shared folder
def test_benchmark_never_replaces_files_it_did_not_write(tmp_path):
    stage = Benchmark(user_project(tmp_path))
    root = stage.project.root
    args = ["--models=lead-3", f"--dataset={stage.project.data}", "--split=all", "--n_samples=3", "--bertscore_model="]
    run_stage(stage.script, *args, root=root)
    out = root / "outputs" / "benchmarks"
    (out / "predictions" / "my_notes.csv").write_text("mine\n")
    before = snapshot(root)
    result = run_stage(stage.script, *args, "--overwrite=True", root=root, check=False)
    assert_refused(result, "predictions/ holds files that benchmark_models did not write", before, root)
    (out / "predictions" / "my_notes.csv").unlink()
    (out / "run_config.json").write_text(json.dumps({"stage": "train_bart_lora"}))   # someone else's record
    before = snapshot(root)
    result = run_stage(stage.script, *args, "--overwrite=True", root=root, check=False)
    assert_refused(result, "already holds files that benchmark_models did not write", before, root)


def test_recommend_replaces_and_removes_only_its_own_unchanged_files(tmp_path):
    import recommend_finetune
    stage = Recommend(user_project(tmp_path))
    out = tmp_path / "plans"
    ranking = write_ranking(tmp_path / "r.csv", [ranking_row("alpha", "org/alpha", 0.9),
                                                 ranking_row("beta", "org/beta", 0.8),
                                                 ranking_row("gamma", "org/gamma", 0.7)])
    base = [f"--ranking={ranking}", "--overview=", "--gpu_name=T4", f"--trainer={stage.trainer}",
            f"--output_dir={out}"]
    recommend_finetune.main(base + ["--top_k=3"])
    assert {p.name for p in out.glob("train_*.sh")} == {"train_alpha.sh", "train_beta.sh", "train_gamma.sh"}
    (out / "train_beta.sh").write_text("# my edits\n")          # the user edited one of them
    (out / "train_mine.sh").write_text("# my own script\n")     # and wrote their own
    recommend_finetune.main(base + ["--top_k=1"])
    assert (out / "train_beta.sh").read_text() == "# my edits\n"   # edited: kept
    assert (out / "train_mine.sh").read_text() == "# my own script\n"   # never ours: untouched
    assert not (out / "train_gamma.sh").exists() and (out / "train_alpha.sh").exists()   # ours, unchanged: removed
    # a file of the user's with the name a plan wants is refused, not replaced
    (out / "train_alpha.sh").unlink()
    recommend_finetune.main(base + ["--top_k=1"])
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "train_alpha.sh").write_text("# mine\n")
    write_ranking(tmp_path / "fresh" / "final_ranking.csv", [ranking_row("alpha", "org/alpha")])
    (tmp_path / "fresh" / "recommend_finetune.run_config.json").write_text(json.dumps(
        {"stage": "recommend_finetune", "schema_version": 2, "files": {"finetune_plan.md": None}}))
    with pytest.raises(UserError, match="train_alpha.sh exists and was not written by recommend_finetune"):
        recommend_finetune.main([*base[:-1], f"--output_dir={tmp_path / 'fresh'}", "--top_k=1"])
    assert (tmp_path / "fresh" / "train_alpha.sh").read_text() == "# mine\n"


# ----------------------------------------------------------------------------- corrupt inputs
def corrupt_rankings(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    folder = tmp_path / "rankings"
    folder.mkdir(exist_ok=True)
    cases = {}

    def case(name: str, content: bytes, message: str) -> None:
        path = folder / f"{name}.csv"
        path.write_bytes(content)
        cases[name] = (path, message)
    case("empty", b"", "is empty")
    case("blank", b"\n\n  \n", "is empty")
    case("binary", bytes(range(256)) * 4, "is not UTF-8 text")
    case("latin1", "model,status\nmod\xe8le,ok\n".encode("latin-1"), "is not UTF-8 text")
    case("nul", b"model,status\nx\x00y,ok\n", "holds NUL bytes")
    case("foreign", b"name,age\nann,3\n", "has no 'model' column")
    case("only-failures", b"model,kind,status\nbroken,model,error\nlead-3,reference,ok\n", "no successful model rows")
    case("no-size", b"model,kind,status,source\nmystery,model,ok,no/such-model\n", "has no parameter count")
    cases["folder"] = (folder, "is a folder")
    cases["missing"] = (folder / "absent.csv", "ranking not found")
    return cases


RANKING_CASES = ["empty", "blank", "binary", "latin1", "nul", "foreign", "only-failures", "no-size", "folder",
                 "missing"]


@pytest.mark.parametrize("case", RANKING_CASES)
def test_corrupt_ranking_is_one_line(tmp_path, case):
    path, message = corrupt_rankings(tmp_path)[case]
    before = snapshot(tmp_path)
    result = run_stage("recommend_finetune.py", f"--ranking={path}", "--overview=", "--gpu_name=T4",
                       f"--output_dir={tmp_path / 'out'}", root=tmp_path, check=False)
    assert_refused(result, message, before, tmp_path)
    assert not (tmp_path / "out").exists()


OVERVIEWS = {"latin1": ("{\"dataset\": \"d\xe9\"}".encode("latin-1"), "is not UTF-8 text"),
             "not-json": (b"{\"rows\": ", "is not valid JSON"),
             "a-list": (b"[1, 2]", "is not a dataset overview"),
             "bad-rows": (b"{\"rows\": {\"train\": \"many\"}}", "'train' must be a row count"),
             "negative-p99": (b"{\"lengths\": {\"dialogue\": {\"tokens\": {\"p99\": -5}}}}",
                              "p99 token count must be a number >= 0"),
             "bad-lengths": (b"{\"lengths\": {\"dialogue\": 7}}", "'lengths' is not laid out")}


@pytest.mark.parametrize("case", [*sorted(OVERVIEWS), "named-but-missing", "a-folder"])
def test_corrupt_overview_is_one_line(tmp_path, case):
    ranking = write_ranking(tmp_path / "r.csv", [ranking_row("m", "org/m")])
    overview = tmp_path / "overview.json"
    if case in OVERVIEWS:
        overview.write_bytes(OVERVIEWS[case][0])
    elif case == "a-folder":
        overview.mkdir()
    message = OVERVIEWS[case][1] if case in OVERVIEWS else {"named-but-missing": "does not exist",
                                                            "a-folder": "is a folder"}[case]
    before = snapshot(tmp_path)
    result = run_stage("recommend_finetune.py", f"--ranking={ranking}", f"--overview={overview}", "--gpu_name=T4",
                       f"--output_dir={tmp_path / 'out'}", root=tmp_path, check=False)
    assert_refused(result, message, before, tmp_path)


@pytest.mark.parametrize("case, content, message", [
    ("missing", None, "is not a Python stage script"),
    ("not-python", "x = 1\n", "is not a Python stage script"),
    ("syntax-error", "MODEL = (\n", "cannot read its settings block"),
    ("no-settings", "import os\n", "declares no settings"),
])
def test_bad_trainer_is_one_line(tmp_path, case, content, message):
    ranking = write_ranking(tmp_path / "r.csv", [ranking_row("m", "org/m")])
    trainer = tmp_path / ("trainer.txt" if case == "not-python" else "trainer.py")
    if content is not None:
        trainer.write_text(content)
    before = snapshot(tmp_path)
    result = run_stage("recommend_finetune.py", f"--ranking={ranking}", "--overview=", "--gpu_name=T4",
                       f"--trainer={trainer}", f"--output_dir={tmp_path / 'out'}", root=tmp_path, check=False)
    assert_refused(result, message, before, tmp_path)


@pytest.mark.parametrize("case, content, message", [
    ("empty", b"", "is empty: no dialogues to read"),
    ("latin1", "{\"dialogue\": \"caf\xe9\", \"summary\": \"x\"}\n".encode("latin-1"), "not UTF-8 text"),
    ("garbled", b"{\"dialogue\": \n", "cannot be read as json"),
    ("no-columns", b"{\"a\": \"b\"}\n", "no dialogue column found"),
])
def test_corrupt_data_is_one_line(tmp_path, case, content, message):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    before = snapshot(tmp_path)
    result = run_stage("benchmark_models.py", "--models=lead-3", f"--dataset={data}", "--split=all",
                       "--bertscore_model=", root=tmp_path, check=False)
    assert_refused(result, message, before, tmp_path)
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("models, message", [
    ("", "MODELS is empty"), (" , ,", "MODELS is empty"), ("lead-0", "a baseline needs at least 1 turn"),
    ("extractive-0,lead-3", "a baseline needs at least 1 turn"),
    ("./missing-model,../../no/such/path.gguf", "every entry of MODELS failed"),
])
def test_bad_models_entries_are_one_line(tmp_path, models, message):
    from conftest import SAMPLES
    before = snapshot(tmp_path)
    result = run_stage("benchmark_models.py", f"--models={models}", f"--dataset={SAMPLES}", "--split=all",
                       "--n_samples=2", "--bertscore_model=", root=tmp_path, check=False)
    assert_refused(result, message, before, tmp_path)
    assert not (tmp_path / "outputs").exists()


# ----------------------------------------------------------------------------- bad and contradictory settings
BENCHMARK_SETTINGS = [("--batch_size=0", "--BATCH_SIZE=0: out of range"), ("--n_samples=-1", "--N_SAMPLES=-1"),
                      ("--max_input_length=0", "--MAX_INPUT_LENGTH=0"), ("--lead_k=0", "--LEAD_K=0"),
                      ("--warmup_samples=-2", "--WARMUP_SAMPLES=-2"), ("--seed=-1", "--SEED=-1"),
                      ("--max_new_tokens=0", "--MAX_NEW_TOKENS=0"), ("--num_beams=0", "--NUM_BEAMS=0"),
                      ("--quality_weight=-1", "--QUALITY_WEIGHT=-1"), ("--speed_weight=nan", "is not a finite number"),
                      ("--speed_weight=1e999", "is not a finite number"), ("--val_fraction=1", "--VAL_FRACTION=1"),
                      ("--quality_weight=0 --speed_weight=0", "not both 0"),
                      ("--min_new_tokens=9 --max_new_tokens=8", "MIN_NEW_TOKENS=9 is more than MAX_NEW_TOKENS=8")]
RECOMMEND_SETTINGS = [("--memory_margin=5", "--MEMORY_MARGIN=5: out of range"),
                      ("--memory_margin=0", "--MEMORY_MARGIN=0"), ("--top_k=0", "--TOP_K=0"),
                      ("--gpu_memory_gb=0", "--GPU_MEMORY_GB=0"),
                      ("--gpu_memory_gb=-3", "--GPU_MEMORY_GB=-3"), ("--epochs=0", "--EPOCHS=0"),
                      ("--epochs=inf", "is not a finite number"), ("--micro_batch=0", "--MICRO_BATCH=0"),
                      ("--train_samples=-1", "--TRAIN_SAMPLES=-1"), ("--gpu_name=RTX-9999", "unknown GPU_NAME"),
                      ("--max_input_length=2048", "MAX_INPUT_LENGTH=2048 is over MAX_INPUT_CAP=1024"),
                      ("--max_target_length=300", "MAX_TARGET_LENGTH=300 is over MAX_TARGET_CAP=256"),
                      ("--max_input_cap=8", "--MAX_INPUT_CAP=8")]


@pytest.mark.parametrize("flags, message", BENCHMARK_SETTINGS)
def test_bad_benchmark_settings_are_one_clear_error(tmp_path, flags, message):
    import benchmark_models
    from conftest import SAMPLES
    out = tmp_path / "out"
    with pytest.raises(UserError) as caught:
        benchmark_models.main(["--models=lead-3", f"--dataset={SAMPLES}", f"--output_dir={out}", *flags.split()])
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize("flags, message", RECOMMEND_SETTINGS)
def test_bad_recommend_settings_are_one_clear_error(tmp_path, flags, message):
    import recommend_finetune
    ranking = write_ranking(tmp_path / "r.csv", [ranking_row("m", "org/m")])
    out = tmp_path / "out"
    argv = [f"--ranking={ranking}", "--overview=", f"--output_dir={out}", *flags.split()]
    if "gpu_name" not in flags:
        argv.append("--gpu_name=T4")
    with pytest.raises(UserError) as caught:
        recommend_finetune.main(argv)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not out.exists()


# ----------------------------------------------------------------------------- command injection into scripts
HOSTILE_NAMES = ["evil\ntouch PWNED", "$(touch PWNED)", "`touch PWNED`", "it's \"quoted\" \\ back\\",
                 "x; rm -rf PWNED_DIR; touch PWNED", "../../../escape", "-rf --OUTPUT_DIR=/",
                 "cr\rtouch PWNED\u2028next\x85line", "tab\there && touch PWNED", "$HOME ${PATH} !! $((1+1))",
                 "' ; touch PWNED ; '", "--MODEL=other"]
HOSTILE_DATASET = "data/d'$(touch PWNED)'\n`touch PWNED`.jsonl"


def fake_python(bin_dir: Path) -> Path:
    """The interpreter the scripts are generated with, at a hostile path:
    `python -m accelerate.commands.launch [--flags] trainer.py args...` -> `python trainer.py args...`."""
    bin_dir.mkdir(parents=True)
    stub = bin_dir / "python"
    stub.write_text('#!/usr/bin/env bash\n[ "$1" = -m ] && [ "$2" = accelerate.commands.launch ] || exit 97\nshift 2\n'
                    'while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done\nexec "$STUB_PYTHON" "$@"\n')
    stub.chmod(0o755)
    return stub


def markers(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("PWNED*") if p.name != "PWNED_DIR"]


def test_generated_scripts_are_inert_for_hostile_names(tmp_path, monkeypatch):
    import recommend_finetune
    rows = [ranking_row(name, name if i % 2 else f"org/{i}-{name}", 1.0 - i / 100)
            for i, name in enumerate(HOSTILE_NAMES)]
    ranking = write_ranking(tmp_path / "ranking.csv", rows)
    trainer_dir = tmp_path / "it's $(touch PWNED) `x` dir"
    trainer_dir.mkdir()
    trainer = trainer_dir / "my trainer's.py"
    trainer.write_text(trainer_stub_source())
    out = tmp_path / "plan out"
    python = fake_python(tmp_path / "py $(touch PWNED) 'x' `y`")
    monkeypatch.setattr(sys, "executable", str(python))   # the interpreter that generates the scripts
    result = recommend_finetune.main([f"--ranking={ranking}", "--overview=", "--gpu_name=T4\ntouch PWNED",
                                      f"--dataset={HOSTILE_DATASET}", f"--trainer={trainer}", f"--output_dir={out}",
                                      f"--top_k={len(HOSTILE_NAMES)}"])
    monkeypatch.undo()
    plans = result["recommendations"]
    assert [p["model"] for p in plans] == HOSTILE_NAMES and all(p["fits"] for p in plans)
    scripts = [Path(p["script"]) for p in plans]
    assert len(set(scripts)) == len(scripts) and all(s.parent == out for s in scripts)
    assert all(re.fullmatch(r"train_[a-z0-9][a-z0-9._-]*\.sh", s.name) and ".." not in s.name for s in scripts)
    assert {p.name for p in out.iterdir()} == {s.name for s in scripts} | {
        "recommendations.json", "finetune_plan.md", "recommend_finetune.run_config.json"}
    cwd = tmp_path / "cwd"
    for folder in (cwd / "PWNED_DIR", trainer_dir / "PWNED_DIR"):
        folder.mkdir(parents=True)
    env = {**os.environ, "PATH": "/usr/bin:/bin", "STUB_PYTHON": sys.executable}   # no accelerate on PATH
    for plan, script in zip(plans, scripts):
        lines = script.read_text().split("\n")
        assert lines[0] == "#!/usr/bin/env bash" and all(line.startswith("# ") for line in lines[1:4])
        assert lines[4] == "set -euo pipefail"
        assert lines[6].startswith(f"exec {shlex.quote(str(python))} -m accelerate.commands.launch ")
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
        record = tmp_path / f"{script.stem}.json"
        done = subprocess.run(["bash", str(script), "--NOTE=$(touch PWNED)"], cwd=cwd, capture_output=True,
                              text=True, env={**env, "STUB_OUT": str(record)}, timeout=120)
        assert done.returncode == 0, done.stderr
        received = json.loads(record.read_text())
        assert received["argv"] == [f"--{k}={v}" for k, v in plan["flags"].items()] + ["--NOTE=$(touch PWNED)"]
        assert plan["flags"]["MODEL"] == plan["source"] and plan["flags"]["DATASET"] == HOSTILE_DATASET
        assert Path(received["cwd"]).resolve() == trainer_dir.resolve()
    assert {p["source"] for p in plans} >= set(HOSTILE_NAMES[1::2])   # the hostile sources reached the trainer
    assert markers(tmp_path, REPO) == []
    assert (cwd / "PWNED_DIR").is_dir() and (trainer_dir / "PWNED_DIR").is_dir()
    outside_code = re.sub(r"(`{3,})bash\n.*?\n\1\n", "", (out / "finetune_plan.md").read_text(), flags=re.S)
    assert not any(line.lstrip().startswith(("touch PWNED", "next")) for line in outside_code.splitlines())


def test_prediction_files_stay_inside_output_dir(tmp_path):
    """Entries whose names look like paths give file-name-safe labels; nothing lands outside."""
    from conftest import SAMPLES
    project = user_project(tmp_path)
    before = snapshot(project.root)
    run_stage("benchmark_models.py", "--models=lead-3,lead-2,../../../../tmp/x,...,-rf", f"--dataset={SAMPLES}",
              "--split=all", "--n_samples=2", "--bertscore_model=", "--isolate=false", root=project.root)
    after = snapshot(project.root)
    assert {k for k in after if not k.startswith("outputs/")} == set(before)
    predictions = {k for k in after if k.startswith("outputs/benchmarks/predictions/")}
    assert predictions == {"outputs/benchmarks/predictions/lead-3_predictions.csv",
                           "outputs/benchmarks/predictions/lead-2_predictions.csv"}
    rows = list(csv.DictReader(open(project.root / "outputs/benchmarks/final_ranking.csv", encoding="utf-8")))
    assert {r["model"] for r in rows} == {"lead-3", "lead-2", "x", "model", "rf"}


@pytest.mark.parametrize("import_dir, message", [(".git", "is inside a .git folder"),
                                                 ("..", "is the project root or a folder above it")])
def test_gguf_import_folder_is_checked_before_anything_runs(tmp_path, import_dir, message):
    project = user_project(tmp_path)
    gguf = project.root / "models" / "project.gguf"   # imported as <GGUF_IMPORT_DIR>/project: the root itself for ".."
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF not really")
    before = snapshot(project.root)
    result = run_stage("benchmark_models.py", f"--models={gguf},lead-3", f"--dataset={project.data}",
                       "--split=all", "--n_samples=2", "--bertscore_model=", f"--gguf_import_dir={import_dir}",
                       root=project.root, check=False)
    assert_refused(result, message, before, project.root)
