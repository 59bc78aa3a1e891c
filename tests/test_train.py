"""train_bart_lora.py and finetuneflow/training.py: both model families train on the bundled samples
and write exactly the adapter folder contract; QLoRA trains on CPU past an evaluation; a SIGKILL
leaves a resumable checkpoint; settings changes are refused; two processes train under accelerate;
bad input fails with one line. Plus unit tests of tokenization, collation, LoRA targets and the
run-folder logic. Tiny models, a few samples and steps each."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import OFFLINE_ENV, REPO, SAMPLES, error_line, files_under, run_stage
from finetuneflow.train import training
from finetuneflow.contract.data import load_dialogues
from finetuneflow.contract.errors import UserError
from finetuneflow.model.family import CAUSAL, SEQ2SEQ
from finetuneflow.model.loading import load_model, load_tokenizer
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION

SCRIPT = "train_bart_lora.py"
CONTRACT = {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "run_config.json", "train_metrics.json", "loss_curve.png"}
FAST = [f"--dataset={SAMPLES}", "--train_samples=16", "--val_samples=4", "--max_input_length=192",
        "--max_target_length=64", "--max_new_tokens=12", "--num_beams=1", "--logging_steps=2",
        "--learning_rate=0.01", "--eval_batch_size=4"]


def train_main():
    """The script's main() in this process (for quick checks that need no fresh interpreter)."""
    spec = importlib.util.spec_from_file_location("train_bart_lora", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def losses(metrics: dict) -> list[float]:
    return [point["loss"] for point in metrics["loss_curve"]]


# ----------------------------------------------------------------------------- end to end

def test_tiny_bart_trains_writes_the_contract_and_refuses_changed_settings(tiny_models, project):
    result = run_stage(SCRIPT, f"--model_name={tiny_models['bart']}", "--max_steps=10", "--eval_steps=5",
                       "--output_dir=ft_outputs/bart", *FAST, root=project)
    out = project / "ft_outputs" / "bart"
    assert files_under(out) == CONTRACT
    assert "trainable of" in result.stdout and "best validation ROUGE-L" in result.stdout

    record = json.loads((out / "run_config.json").read_text())
    assert record["stage"] == "train_bart_lora" and record["family"] == SEQ2SEQ
    assert record["lineage"]["base_model"] == str(tiny_models["bart"]) and record["lineage"]["adapter"] == "ft_outputs/bart"
    assert record["schema_version"] == 2 and len(record["split"]["train_fingerprints"]) == 16
    assert record["lora"] == {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    assert record["generation"] == {"num_beams": 1, "max_new_tokens": 12, "min_new_tokens": None,
                                    "no_repeat_ngram_size": None, "length_penalty": 1.0}
    assert record["max_input_length"] == 192 and record["max_target_length"] == 64
    assert record["load_in_4bit"] is False and record["prompt_style"] == "seq2seq"
    assert record["instruction"] == DEFAULT_INSTRUCTION and record["split"]["train_rows"] == 16
    assert sorted(record["files"]) == sorted(CONTRACT)

    metrics = json.loads((out / "train_metrics.json").read_text())
    assert [e["step"] for e in metrics["evals"]] == [0, 5, 10]           # zero-shot, mid, end
    assert all(0 <= e["rougeL"] <= 100 and e["eval_loss"] > 0 for e in metrics["evals"])
    assert metrics["best_step"] in (5, 10) and metrics["zero_shot_rougeL"] is not None
    assert min(losses(metrics)[1:]) < losses(metrics)[0]
    assert metrics["throughput"]["samples_per_s"] > 0 and metrics["throughput"]["tokens_per_s"] > 0
    assert metrics["memory"]["peak_rss_mb"] > 0 and metrics["global_step"] == 10

    loaded = load_model(str(out))                       # later stages find the base from run_config.json
    assert loaded.adapter == str(out) and type(loaded.model).__name__ == "PeftModelForSeq2SeqLM"

    main = train_main()
    again = [f"--model_name={tiny_models['bart']}", "--max_steps=10", "--eval_steps=5", f"--output_dir={out}",
             f"--cache_dir={project / '.cache' / 'tokenized'}", *FAST]
    assert main(again)["already_finished"] is True       # same settings: nothing to do
    with pytest.raises(UserError, match=r"finished run with other settings \(LEARNING_RATE 0.01 -> 0.02\).*OVERWRITE"):
        main([*again, "--learning_rate=0.02"])
    assert files_under(out) == CONTRACT


def test_sigkill_leaves_a_resumable_checkpoint_for_tiny_llama(tiny_models, project):
    args = [sys.executable, str(REPO / SCRIPT), f"--model_name={tiny_models['llama']}", "--max_steps=12",
            "--eval_steps=3", "--eval_on_start=False", "--output_dir=run", *FAST]
    env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(project)}
    checkpoints = project / "run" / "checkpoints"
    first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(checkpoints.glob("checkpoint-*/" + training.COMPLETE_MARKER)):
        assert first.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (project / "run" / "run_config.json").exists()
    half = checkpoints / "checkpoint-999"                # what a kill during a save leaves behind
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"partial")

    result = run_stage(SCRIPT, *args[2:], root=project)
    assert "resuming from checkpoint-" in result.stdout
    out = project / "run"
    assert files_under(out) == CONTRACT | {"chat_template.jinja"}
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["global_step"] == 12 and metrics["resumed_from_step"] >= 3
    assert [e["step"] for e in metrics["evals"]] == [3, 6, 9, 12]
    assert min(losses(metrics)[1:]) < losses(metrics)[0]
    record = json.loads((out / "run_config.json").read_text())
    assert record["family"] == CAUSAL and record["prompt_style"] == "chat_template"
    assert record["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    loaded = load_model(str(out))
    assert loaded.family == CAUSAL and loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id


def test_qlora_trains_on_cpu_past_a_mid_training_evaluation(tiny_models, tmp_path):
    from safetensors.torch import load_file
    out = tmp_path / "qlora"
    metrics = train_main()([f"--model_name={tiny_models['llama']}", "--load_in_4bit=True", "--max_steps=8",
                            "--eval_steps=4", "--eval_on_start=False", "--keep_checkpoints=True",
                            f"--output_dir={out}", f"--cache_dir={tmp_path / 'cache'}", *FAST])
    assert metrics["precision"].startswith("4-bit")
    assert json.loads((out / "run_config.json").read_text())["load_in_4bit"] is True
    after_eval = [p["loss"] for p in metrics["loss_curve"] if p["step"] > 4]
    assert after_eval and min(after_eval) < losses(metrics)[0]
    mid = load_file(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    end = load_file(out / "checkpoints" / "checkpoint-8" / "adapter_model.safetensors")
    assert any(not torch.equal(mid[k], end[k]) for k in mid)   # the adapter kept learning after the eval
    assert CONTRACT <= files_under(out)


def test_two_processes_under_accelerate_launch(tiny_models, project):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(project), "CUDA_VISIBLE_DEVICES": ""}
    # without a GPU every process is a CPU process and DDP runs over gloo
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), str(REPO / SCRIPT), f"--model_name={tiny_models['bart']}",
               "--max_steps=4", "--eval_steps=2", "--output_dir=ddp", *FAST]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_under(project / "ddp") == CONTRACT
    metrics = json.loads((project / "ddp" / "train_metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["global_step"] == 4


def test_bad_input_fails_with_one_clear_line(tiny_models, project, tmp_path):
    result = run_stage(SCRIPT, f"--model_name={tiny_models['llama']}", "--target_modules=q_proj,wq",
                       "--output_dir=bad", *FAST, root=project, check=False)
    assert result.returncode == 2
    line = error_line(result)
    assert "TARGET_MODULES wq not found" in line and "down_proj, gate_proj, k_proj" in line
    assert not (project / "bad").exists()                  # a run that cannot start touches nothing

    main = train_main()
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"dialogue": "", "summary": "x"}\n{"dialogue": "Hi", "summary": " "}\n')
    with pytest.raises(UserError, match="no usable rows") as info:
        main([f"--model_name={tiny_models['bart']}", f"--dataset={empty}", f"--output_dir={tmp_path / 'o1'}"])
    assert "\n" not in str(info.value)
    too_long = r"MAX_INPUT_LENGTH=768 \+ MAX_TARGET_LENGTH=192 = 960 tokens is more than .* \(512 positions\)"
    with pytest.raises(UserError, match=too_long):
        main([f"--model_name={tiny_models['llama']}", f"--dataset={SAMPLES}", f"--output_dir={tmp_path / 'o2'}"])
    with pytest.raises(UserError, match=r"MAX_INPUT_LENGTH=1024 is more than .* \(512 tokens\)"):
        main([f"--model_name={tiny_models['bart']}", f"--dataset={SAMPLES}", "--max_input_length=1024",
              f"--output_dir={tmp_path / 'o3'}"])
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


# ----------------------------------------------------------------------------- library units

@pytest.fixture(scope="module")
def samples():
    return load_dialogues(str(SAMPLES), seed=42).splits["train"]


def spec_for(family: str, max_input: int = 128, max_target: int = 32) -> training.EncodingSpec:
    return training.EncodingSpec(family, DEFAULT_INSTRUCTION, "", max_input, max_target)


def test_causal_rows_learn_only_the_summary_and_keep_eos(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models["llama"]), CAUSAL)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id      # the hard case: pad == eos
    long_dialogue = json.loads([line for line in SAMPLES.read_text().splitlines() if "sample-long-meeting" in line][0])
    row = training.encode_example(tokenizer, spec_for(CAUSAL), long_dialogue["dialogue"], "Short summary.")
    summary_ids = tokenizer("Short summary.", add_special_tokens=False)["input_ids"]
    target = [t for t in row["labels"] if t != -100]
    assert target == summary_ids + [tokenizer.eos_token_id]       # loss on summary + EOS only
    assert row["input_ids"][-len(target):] == target and row["input_ids"][-1] == tokenizer.eos_token_id
    prompt_length = len(row["input_ids"]) - len(target)
    assert prompt_length <= 128 and row["input_truncated"]        # the dialogue was cut, not the summary
    assert tokenizer.decode(row["input_ids"][:prompt_length]).endswith("<|im_start|>assistant\n")
    long = training.encode_example(tokenizer, spec_for(CAUSAL, max_target=8), "A: hi\nB: hello", long_dialogue["summary"])
    kept = [t for t in long["labels"] if t != -100]
    assert len(kept) == 8 and kept[-1] == tokenizer.eos_token_id and long["target_truncated"]

    collate = training.make_collator(tokenizer, torch.device("cpu"))
    short = training.encode_example(tokenizer, spec_for(CAUSAL), "A: hi", "Hi.")
    batch = collate([{k: v for k, v in r.items() if k in ("input_ids", "attention_mask", "labels")} for r in (row, short)])
    n = len(short["input_ids"])
    assert batch["labels"][1, n - 1] == tokenizer.eos_token_id    # EOS survives padding although pad == eos
    assert (batch["labels"][1, n:] == -100).all() and (batch["attention_mask"][1, n:] == 0).all()
    assert batch["input_ids"].shape[1] == len(row["input_ids"])   # padded to the longest row, on the right


def test_seq2seq_rows_use_text_target_labels(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models["bart"]), SEQ2SEQ)
    row = training.encode_example(tokenizer, spec_for(SEQ2SEQ, max_input=64, max_target=6),
                                  "A: hello there\nB: hi", "Anna and Tom greet each other warmly today.")
    assert row["labels"][-1] == tokenizer.eos_token_id and len(row["labels"]) == 6 and row["target_truncated"]
    assert row["input_ids"][-1] == tokenizer.eos_token_id and not row["input_truncated"]


def test_tokenization_is_cached_by_settings(tiny_models, samples, tmp_path):
    tokenizer = load_tokenizer(str(tiny_models["llama"]), CAUSAL)
    rows = samples.select(range(6))
    spec = spec_for(CAUSAL, max_input=400, max_target=100)
    first, stats = training.tokenize_split(rows, tokenizer, spec, tmp_path, "train")
    again, stats_again = training.tokenize_split(rows, tokenizer, spec, tmp_path, "train")
    other, stats_other = training.tokenize_split(rows, tokenizer, spec_for(CAUSAL, max_input=96), tmp_path, "train")
    assert (stats["cache"], stats_again["cache"], stats_other["cache"]) == ("written", "reused", "written")
    assert first["input_ids"] == again["input_ids"] != other["input_ids"]
    edited = rows.map(lambda row, i: {"summary": row["summary"] + (" Changed." if i == 5 else "")}, with_indices=True)
    assert training.tokenize_split(edited, tokenizer, spec, tmp_path, "train")[1]["cache"] == "written"  # row 6 counts
    assert first.column_names == ["input_ids", "attention_mask", "labels"]
    assert len({len(ids) for ids in first["input_ids"]}) > 1       # no padding in map


def test_lora_targets_per_architecture(tiny_models):
    bart = load_model(str(tiny_models["bart"]), device="cpu").model
    llama = load_model(str(tiny_models["llama"]), device="cpu").model
    assert training.resolve_target_modules(bart, None, SEQ2SEQ) == ["q_proj", "v_proj"]
    assert training.resolve_target_modules(llama, None, CAUSAL) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert training.resolve_target_modules(llama, "all-linear", CAUSAL) == "all-linear"
    assert training.resolve_target_modules(llama, "gate_proj,up_proj", CAUSAL) == ["gate_proj", "up_proj"]
    with pytest.raises(UserError, match="TARGET_MODULES query not found in 'bart'; its linear modules are: fc1, fc2"):
        training.resolve_target_modules(bart, ["query"], SEQ2SEQ)


def test_run_folder_resumes_only_complete_checkpoints_with_matching_settings(tmp_path):
    out = tmp_path / "out"
    cfg = {"LEARNING_RATE": 0.01, "RESUME": "auto", "OVERWRITE": False}
    plan = training.plan_run(out, cfg, [], "auto", False)
    assert plan.resume_from is None and not plan.finished
    training.prepare_run_dir(plan, cfg, [], keep_checkpoints=False)
    checkpoints = out / training.CHECKPOINTS
    for step in (2, 4, 6):
        (checkpoints / f"checkpoint-{step}").mkdir()
        (checkpoints / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"x" * 10)
    training.mark_complete(checkpoints / "checkpoint-2")
    training.mark_complete(checkpoints / "checkpoint-6")
    (checkpoints / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"x" * 3)   # cut short
    assert training.complete_checkpoints(checkpoints) == [checkpoints / "checkpoint-2"]

    plan = training.plan_run(out, {**cfg, "RESUME": "never"}, [], "auto", False)      # RESUME is not a setting change
    assert plan.resume_from == checkpoints / "checkpoint-2"
    training.prepare_run_dir(plan, cfg, [], keep_checkpoints=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "run_config.json"]

    with pytest.raises(UserError, match=r"unfinished run with other settings \(LEARNING_RATE 0.01 -> 0.1\)"):
        training.plan_run(out, {**cfg, "LEARNING_RATE": 0.1}, [], "auto", False)
    plan = training.plan_run(out, {**cfg, "LEARNING_RATE": 0.1}, [], "auto", True)
    assert plan.wipe
    training.prepare_run_dir(plan, {**cfg, "LEARNING_RATE": 0.1}, [], keep_checkpoints=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["run_config.json"]

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not from train_bart_lora.py"):
        training.plan_run(stranger, cfg, [], "auto", True)
