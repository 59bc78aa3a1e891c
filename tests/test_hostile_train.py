"""Hostile input for train_bart_lora.py, by attack class: every output location a typo or an attacker
would pick (with --OVERWRITE=True, the dangerous flag), corrupt inputs, settings that contradict
each other, and preference tuning (OBJECTIVE=dpo|orpo) without a start adapter it can continue.
Each reproduction must end with exactly one `error:` line, exit code 2, no traceback,
and every file of the user's project (its .git folder included) unchanged; no output is created.

The cases share one user project and run in ONE fresh interpreter (FTF_ROOT = the project), each
through `run_cli(main)` exactly as the script's `__main__` does, with the project's snapshot taken
before and after each; a handful also run as real processes. (One process per case would cost
~35 interpreter starts with torch and transformers: minutes on 2 cores.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import OFFLINE_ENV, REPO, run_stage
from hostile import assert_refused, protected_outputs, snapshot, unwritable, user_project

SCRIPT = "train_bart_lora.py"
QUICK = ["--train_samples=4", "--val_samples=2", "--max_steps=1", "--max_input_length=192",
         "--max_target_length=32", "--max_new_tokens=4", "--num_beams=1", "--eval_on_start=False"]

DRIVER = r"""
import contextlib, importlib.util, io, json, sys, traceback
script, tests, cases_file = sys.argv[1:4]
sys.path.insert(0, tests)
from hostile import snapshot
from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.paths import ROOT
spec = importlib.util.spec_from_file_location("train_bart_lora", script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
results = {}
for name, argv in json.loads(open(cases_file, encoding="utf-8").read()).items():
    before, out, err, code = snapshot(ROOT), io.StringIO(), io.StringIO(), 0
    sys.argv = [script, *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(module.main)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results[name] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                     "changed": sorted(k for k, v in before.items() if snapshot(ROOT).get(k) != v)}
print(json.dumps(results))
"""


def run_cases(root: Path, cases: dict[str, list[str]]) -> dict[str, dict]:
    """Every case's exit code, stdout, stderr and the project files it changed or deleted."""
    cases_file = root.parent / "cases.json"
    cases_file.write_text(json.dumps(cases), encoding="utf-8")
    env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(root)}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(REPO / SCRIPT), str(REPO / "tests"), str(cases_file)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0 and done.stdout.strip(), done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the cases

def protected_cases(project, model: Path) -> dict[str, tuple[list[str], str]]:
    """OUTPUT_DIR on every place the stage must never write, with --OVERWRITE=True."""
    cases = protected_outputs(project, [project.data, model])
    cases.update({"inside the model folder": (str(model / "lora"), "is inside an input of this run"),
                  "the .git folder": (str(project.root / ".git"), "is inside a .git folder"),
                  "the repository": (str(REPO), "is the project root or a folder above it"),
                  "a user's file": (str(project.root / "README.md"), "is a file, not a folder")})
    theirs = project.root / "ft_outputs" / "theirs"      # another stage's output folder
    theirs.mkdir(parents=True)
    (theirs / "adapter_model.safetensors").write_bytes(b"someone else's adapter")
    (theirs / "run_config.json").write_text(json.dumps({"stage": "merge_bart_lora", "config": {}}))
    cases["another stage's output"] = (str(theirs), "already holds files that")
    return {f"OUTPUT_DIR: {name}": ([f"--output_dir={value}", "--overwrite=True"], message)
            for name, (value, message) in cases.items()}


def corrupt_cases(project, model: Path) -> dict[str, tuple[list[str], str]]:
    """Broken data and model files (each made once in the project), and impossible model settings."""
    data, models = project.root / "data", project.root / "models"
    (data / "empty.jsonl").write_bytes(b"")
    (data / "latin1.jsonl").write_bytes('{"dialogue": "caf\xe9", "summary": "x"}\n'.encode("latin-1"))
    (data / "blank.jsonl").write_text('{"dialogue": " ", "summary": "x"}\n{"dialogue": "Hi", "summary": ""}\n')

    def broken(name: str, change) -> str:
        folder = models / name
        shutil.copytree(model, folder)
        change(folder)
        return f"--model={folder}"

    def quantized(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        (folder / "config.json").write_text(json.dumps(config))

    def pickled(folder: Path) -> None:
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not a safe file")

    adapter_config = json.dumps({"base_model_name_or_path": str(model), "task_type": "CAUSAL_LM"})
    cases = {
        "empty data file": ([f"--dataset={data / 'empty.jsonl'}"], "is empty: no dialogues to read"),
        "non-UTF-8 data file": ([f"--dataset={data / 'latin1.jsonl'}"], "not UTF-8 text"),
        "only empty rows": ([f"--dataset={data / 'blank.jsonl'}"], "no usable"),
        "bad config.json": ([broken("bad-config", lambda f: (f / "config.json").write_text("{not json"))],
                            "cannot load the model config"),
        "truncated safetensors": ([broken("truncated", lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:1000]))], "cannot load model"),
        "pickled .bin weights only": ([broken("pickled", pickled)], "cannot load model"),
        "4-bit saved base": ([broken("quantized", quantized)], "already-quantized weights"),
        "adapter folder as MODEL": ([broken("adapter", lambda f: (f / "adapter_config.json").write_text(
            adapter_config))], "is an adapter folder"),
        "missing model folder": ([f"--model={models / 'nowhere'}"], "model not found"),
        "unknown TARGET_MODULES": (["--target_modules=q_proj,wq"], "TARGET_MODULES wq not found"),
        "empty TARGET_MODULES": (["--target_modules=,"], "TARGET_MODULES is empty"),
        "lengths over the model's positions": (["--max_input_length=500", "--max_target_length=100"],
                                               "is more than"),
        "input length below the prompt template": (["--max_input_length=16"], "leaves"),
    }
    return {f"corrupt: {name}": ([*args, "--output_dir=ft_outputs/lora"], message)
            for name, (args, message) in cases.items()}


def contradiction_cases(project, model: Path) -> dict[str, tuple[list[str], str]]:
    finished = project.root / "ft_outputs" / "finished"   # a finished run of this stage, other settings
    finished.mkdir(parents=True)
    (finished / "adapter_model.safetensors").write_bytes(b"an earlier adapter")
    (finished / "run_config.json").write_text(json.dumps({
        "stage": "train_bart_lora", "schema_version": 2, "config": {"LEARNING_RATE": 0.5},
        "files": ["adapter_model.safetensors", "run_config.json"]}))
    cases = {
        "RESUME of a checkpoint with OVERWRITE": (["--resume=checkpoint-3", "--overwrite=True"],
                                                  "contradict each other"),
        "RESUME that is no checkpoint": (["--resume=latest"], "use auto, never, or the name of a checkpoint"),
        "RESUME with nothing to resume": (["--resume=checkpoint-3"], "holds no unfinished run to resume"),
        "zero beams": (["--num_beams=0"], "out of range"),
        "zero new tokens": (["--max_new_tokens=0"], "out of range"),
        "EVAL_STEPS beyond MAX_STEPS": (["--max_steps=2", "--eval_steps=5"], "no evaluation would pick"),
        "MIN_NEW_TOKENS over MAX_NEW_TOKENS": (["--min_new_tokens=9"], "is more than MAX_NEW_TOKENS"),
        "CACHE_DIR inside OUTPUT_DIR": (["--cache_dir=ft_outputs/lora/cache"], "is inside OUTPUT_DIR"),
        "CACHE_DIR is the dataset": ([f"--cache_dir={project.data}"], "is an input of this run"),
        "CACHE_DIR is the project root": (["--cache_dir=."], "is the project root"),
        "CACHE_DIR is a user's file": (["--cache_dir=README.md"], "is a file, not a folder"),
        "non-finite learning rate": (["--learning_rate=1e999"], "is not a finite number"),
        "learning rate of 1": (["--learning_rate=1"], "out of range"),
        "zero batch size": (["--batch_size=0"], "out of range"),
        "negative seed": (["--seed=-1"], "out of range"),
        "zero epochs": (["--epochs=0"], "out of range"),
        "finished run, other settings, no OVERWRITE": ([f"--output_dir={finished}"],
                                                       "holds a finished run with other settings"),
        "unknown precision": (["--precision=fp8"], "must be one of auto, fp32, bf16, fp16"),
        "unknown tracker": (["--report_to=tensorbord"], "must be one of wandb, tensorboard, mlflow"),
        "TRACKING_DIR inside OUTPUT_DIR": (["--report_to=mlflow", "--tracking_dir=ft_outputs/lora/runs"],
                                           "is inside OUTPUT_DIR"),
        "TRACKING_DIR is the project root": (["--report_to=tensorboard", "--tracking_dir=."], "is the project root"),
        "TRACKING_DIR is a user's file": (["--report_to=tensorboard", "--tracking_dir=README.md"],
                                          "is a file, not a folder"),
        "TRACKING_DIR is the dataset": (["--report_to=tensorboard", f"--tracking_dir={project.data}"],
                                        "is an input of this run"),
        "unknown SELECT_ON": (["--select_on=faithful"], "must be one of rougeL, rougeL_faithful"),
        "faithfulness margin over 1": (["--faithfulness_margin=2"], "out of range"),
        "negative evaluation budget": (["--eval_budget_seconds=-1"], "out of range"),
        "infinite evaluation budget": (["--eval_budget_seconds=inf"], "is not a finite number"),
        "negative evaluation rows": (["--eval_generate_samples=-3"], "out of range"),
        "MIN_NEW_TOKENS over the family default": (["--max_new_tokens=None", "--min_new_tokens=40"],
                                                   "is more than MAX_NEW_TOKENS"),
    }
    if not torch_cuda():   # on a GPU fp16 is a valid request
        cases["fp16 on a CPU"] = (["--precision=fp16"], "--precision=fp16 needs a CUDA GPU")
    return {f"settings: {name}": (["--output_dir=ft_outputs/lora", *args], message)
            for name, (args, message) in cases.items()}


def fake_adapter(folder: Path, base: Path | str, family: str = "causal", stage: str = "train_bart_lora") -> str:
    """An adapter folder as a finished run leaves it, as far as the checks before loading read it."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "run_config.json").write_text(json.dumps({
        "stage": stage, "schema_version": 2, "family": family, "lineage": {"base_model": str(base)},
        "config": {}, "files": ["adapter_config.json", "adapter_model.safetensors", "run_config.json"]}))
    return str(folder)


def preference_cases(project, model: Path) -> dict[str, tuple[list[str], str]]:
    """OBJECTIVE=dpo|orpo without what it needs, or with a start adapter it cannot continue."""
    adapters = project.root / "adapters"
    own = fake_adapter(adapters / "own", model)
    other = fake_adapter(adapters / "other-base", project.root / "models" / "another-model")
    merged = fake_adapter(adapters / "merged", model, stage="merge_bart_lora")
    bart = project.root / "models" / "tiny-bart"
    seq2seq = fake_adapter(adapters / "bart", bart, family="seq2seq")
    plain = adapters / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not an adapter")
    cases = {
        "dpo without START_ADAPTER": (["--objective=dpo"], "START_ADAPTER is not set"),
        "orpo without START_ADAPTER": (["--objective=orpo"], "START_ADAPTER is not set"),
        "START_ADAPTER for sft": ([f"--start_adapter={own}"], "is for OBJECTIVE=dpo or orpo"),
        "PREFERENCE_BETA for sft": (["--preference_beta=0.2"], "PREFERENCE_BETA is for OBJECTIVE=dpo or orpo"),
        "unknown negative kind": (["--objective=dpo", f"--start_adapter={own}", "--negatives=name,digit"],
                                  "must be one of name, number, speaker, sentence"),
        "no negative kind": (["--objective=dpo", f"--start_adapter={own}", "--negatives="], "NEGATIVES is empty"),
        "negative PAIRS_PER_ROW": (["--objective=dpo", f"--start_adapter={own}", "--pairs_per_row=-1"],
                                   "out of range"),
        "zero PREFERENCE_BETA": (["--objective=dpo", f"--start_adapter={own}", "--preference_beta=0"],
                                 "out of range"),
        "START_ADAPTER missing": (["--objective=dpo", f"--start_adapter={adapters / 'nowhere'}"], "is not a folder"),
        "START_ADAPTER not an adapter": (["--objective=dpo", f"--start_adapter={plain}"], "is not an adapter folder"),
        "START_ADAPTER of another stage": (["--objective=dpo", f"--start_adapter={merged}"],
                                           "holds no finished train_bart_lora.py run"),
        "START_ADAPTER of another base": (["--objective=dpo", f"--start_adapter={other}"],
                                          f"was trained on {project.root / 'models' / 'another-model'}, not on MODEL"),
        "dpo on a seq2seq model": (["--objective=dpo", f"--start_adapter={seq2seq}", f"--model={bart}"],
                                   "TRL's DPOTrainer trains decoder-only models only"),
        "OUTPUT_DIR is the START_ADAPTER": (["--objective=orpo", f"--start_adapter={own}", f"--output_dir={own}",
                                             "--overwrite=True"], "is an input of this run"),
    }
    return {f"preference: {name}": (["--output_dir=ft_outputs/lora", *args], message)
            for name, (args, message) in cases.items()}


def torch_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


CLASSES = {"protected outputs": protected_cases, "corrupt inputs": corrupt_cases,
           "contradictory settings": contradiction_cases, "preference tuning": preference_cases}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_models):
    """The user's project, every case (class -> name -> (argv, expected message)) and its outcome."""
    project = user_project(tmp_path_factory.mktemp("hostile_train"))
    model = project.root / "models" / "tiny-llama"
    shutil.copytree(tiny_models["llama"], model)
    shutil.copytree(tiny_models["bart"], project.root / "models" / "tiny-bart")
    cases = {attack: make(project, model) for attack, make in CLASSES.items()}
    argv = {name: [f"--model={model}", f"--dataset={project.data}", *QUICK, *args]
            for group in cases.values() for name, (args, _) in group.items()}
    return project, model, cases, run_cases(project.root, argv)


def problem(outcome: dict, message: str) -> str | None:
    """Why a case was not refused cleanly (None when it was)."""
    result = subprocess.CompletedProcess("train", outcome["returncode"], outcome["stdout"], outcome["stderr"])
    try:
        assert_refused(result, message)
    except AssertionError as exc:
        return str(exc).strip().splitlines()[0][:300]
    if outcome["changed"]:
        return f"changed or deleted: {outcome['changed'][:5]}"
    return None


@pytest.mark.parametrize("attack", list(CLASSES))
def test_every_case_is_refused_with_one_line_and_nothing_touched(hostile, attack):
    project, _, cases, outcomes = hostile
    failures = {name: why for name, (_, message) in cases[attack].items()
                if (why := problem(outcomes[name], message))}
    assert not failures, "\n".join(f"{name}: {why}" for name, why in failures.items())
    assert len(cases[attack]) >= 10
    assert not (project.root / "ft_outputs" / "lora").exists()


def test_an_unwritable_place_is_one_error_line(tmp_path, tiny_models):
    project = user_project(tmp_path)
    locked = unwritable(project.root / "locked")
    before = snapshot(project.root)
    result = run_stage(SCRIPT, f"--model={tiny_models['llama']}", f"--dataset={project.data}", *QUICK,
                       f"--output_dir={locked / 'lora'}", root=project.root, check=False)
    locked.chmod(0o700)
    assert_refused(result, "is not writable", before, project.root)


# ----------------------------------------------------------------------------- as real processes

@pytest.mark.parametrize("case", ["OUTPUT_DIR: project root", "corrupt: truncated safetensors",
                                  "settings: finished run, other settings, no OVERWRITE"])
def test_a_real_process_refuses_the_same_way(hostile, case):
    """The in-interpreter runs above behave like the real command (exit code 2 from the process)."""
    project, model, cases, _ = hostile
    messages = {name: message for group in cases.values() for name, (_, message) in group.items()}
    args = {"OUTPUT_DIR: project root": ["--output_dir=.", "--overwrite=True"],
            "corrupt: truncated safetensors": [f"--model={project.root / 'models' / 'truncated'}",
                                               "--output_dir=ft_outputs/lora"],
            "settings: finished run, other settings, no OVERWRITE":
                [f"--output_dir={project.root / 'ft_outputs' / 'finished'}"]}[case]
    before = snapshot(project.root)
    result = run_stage(SCRIPT, f"--model={model}", f"--dataset={project.data}", *QUICK, *args, root=project.root,
                       check=False)
    assert_refused(result, messages[case], before, project.root)


def test_out_of_memory_while_training_is_one_line_and_the_run_stays_resumable(tmp_path):
    """The translation run_training applies to torch.OutOfMemoryError (and the CPU allocator's
    RuntimeError): the fixes in order, keeping the batch; the run folder keeps its complete checkpoint
    and the same settings resume from it."""
    import torch
    import train_bart_lora
    from finetuneflow.contract.settings import configure
    from finetuneflow.train import run_dir
    from finetuneflow.train.settings import TrainSettings
    from finetuneflow.train.steps import out_of_memory
    cfg = dict(configure(vars(train_bart_lora), ["--batch_size=8", "--grad_accum=2", "--max_input_length=384"]))
    settings = TrainSettings.from_config(cfg)
    out = tmp_path / "run"
    run_dir.prepare_run_dir(run_dir.plan_run(out, cfg, [], "auto", False), cfg, [], keep_checkpoints=False)
    checkpoints = out / run_dir.CHECKPOINTS
    gpu = out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), settings,
                        checkpoints, torch.device("cuda:0"))
    assert str(gpu) == ("training ran out of memory on cuda:0 (BATCH_SIZE=8 x GRAD_ACCUM=2, MAX_INPUT_LENGTH=384); "
                        "try, in this order: --BATCH_SIZE=4 --GRAD_ACCUM=4 (the same batch of 16); "
                        "--GRADIENT_CHECKPOINTING=True; --LOAD_IN_4BIT=True (QLoRA); a shorter --MAX_INPUT_LENGTH "
                        "(now 384); no checkpoint was saved yet: the next command starts over in the same folder")
    saved = checkpoints / "checkpoint-4"
    saved.mkdir()
    (saved / "adapter_model.safetensors").write_bytes(b"x" * 10)
    run_dir.mark_complete(saved)
    (checkpoints / "checkpoint-6").mkdir()   # the save the error interrupted: never marked complete
    cpu = str(out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                                         "allocate memory: you tried to allocate 8589934592 bytes."),
                            settings, checkpoints, torch.device("cpu")))
    assert cpu.startswith("training ran out of memory on cpu") and "LOAD_IN_4BIT" not in cpu
    assert cpu.endswith("checkpoint-4 is kept: the same command resumes from it, changed settings need "
                        "--OVERWRITE=True or a new --OUTPUT_DIR")
    assert run_dir.plan_run(out, cfg, [], "auto", False).resume_from == saved
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), settings, checkpoints,
                         "cpu") is None
    # run_training applies it to what the Trainer raises (a stand-in Trainer: the job and trainer are its arguments)
    from types import SimpleNamespace
    from finetuneflow.contract.errors import UserError
    from finetuneflow.train.steps import run_training

    class OutOfMemoryTrainer:
        def train(self, resume_from_checkpoint=None):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    job = SimpleNamespace(plan=run_dir.RunPlan(out), settings=settings, say=print,
                          state=SimpleNamespace(device=torch.device("cpu"), is_main_process=True))
    with pytest.raises(UserError, match="^training ran out of memory on cpu .* checkpoint-4 is kept"):
        run_training(job, OutOfMemoryTrainer())
    assert run_dir.plan_run(out, cfg, [], "auto", False).resume_from == saved
