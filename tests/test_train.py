"""train_bart_lora.py and finetuneflow/train/: both model families train on the bundled samples
and write exactly the adapter folder contract; QLoRA trains on CPU past an evaluation; a SIGKILL
leaves a resumable checkpoint; settings changes are refused; two processes train under accelerate;
bad input fails with one line. Plus unit tests of tokenization, collation, LoRA targets and the
run-folder logic. Tiny models, a few samples and steps each."""
from __future__ import annotations

import importlib.util
import json
import shutil
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import OFFLINE_ENV, REPO, SAMPLES, error_line, files_under, run_stage
from finetuneflow.train import encoding, lora, run_dir, trainer
from finetuneflow.contract.data import load_dialogues
from finetuneflow.contract.decoding import MBR_FIELDS
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
FAST_LOGGING_STEPS = 2


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
                       "--output_dir=ft_outputs/bart", *FAST, root=project, env={"FTF_CPU_BF16": "1"})
    out = project / "ft_outputs" / "bart"
    assert files_under(out) == CONTRACT
    assert "trainable of" in result.stdout and "best validation ROUGE-L" in result.stdout

    record = json.loads((out / "run_config.json").read_text())
    assert record["stage"] == "train_bart_lora" and record["family"] == SEQ2SEQ
    assert record["lineage"]["base_model"] == str(tiny_models["bart"])
    assert record["lineage"]["adapter"] == "ft_outputs/bart"
    assert record["schema_version"] == 2 and len(record["split"]["train_fingerprints"]) == 16
    assert record["lora"] == {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    assert record["generation"] == {"num_beams": 1, "max_new_tokens": 12, "min_new_tokens": None,
                                    "no_repeat_ngram_size": None, "length_penalty": 1.0, "decoding": None,
                                    **dict.fromkeys(MBR_FIELDS)}
    assert record["max_input_length"] == 192 and record["max_target_length"] == 64
    assert record["load_in_4bit"] is False and record["prompt_style"] == "seq2seq"
    assert record["precision"]["mode"] == "fp32" and "parameters trains faster in fp32" in record["precision"]["reason"]
    assert record["generation_sources"] == {}                            # every decoding value was given
    assert record["instruction"] == DEFAULT_INSTRUCTION and record["split"]["train_rows"] == 16
    assert sorted(record["files"]) == sorted(CONTRACT)

    metrics = json.loads((out / "train_metrics.json").read_text())
    assert [e["step"] for e in metrics["evals"]] == [0, 5, 10]           # zero-shot, mid, end
    assert all(0 <= e["rougeL"] <= 100 and e["eval_loss"] > 0 for e in metrics["evals"])
    assert metrics["best_step"] in (5, 10) and metrics["zero_shot_rougeL"] is not None
    assert metrics["evals"][-1]["eval_loss"] < metrics["evals"][0]["eval_loss"]   # learned (same rows, not batch luck)
    assert all(e["generated_rows"] == 4 and e["generation_seconds"] >= 0 and e["loss_seconds"] >= 0
               for e in metrics["evals"])                                # seq2seq default: every validation row
    assert metrics["evaluation"]["subset_rows"] == 4 and metrics["selection"]["select_on"] == "rougeL"
    assert 0 <= metrics["throughput"]["generation_share"] <= 1
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


def test_a_run_killed_and_resumed_ends_with_the_adapter_of_an_uninterrupted_run(tiny_models, project):
    """SIGKILL once a checkpoint is complete (mid-epoch: 2 steps per epoch, checkpoints every 3),
    resume, and compare with the same command run without interruption: the same batches and the
    same dropout give bit-identical adapters, the same best step and the same losses after resuming."""
    from safetensors.torch import load_file
    from interrupt import kill_at_first_checkpoint
    args = [sys.executable, str(REPO / SCRIPT), f"--model_name={tiny_models['llama']}", "--max_steps=12",
            "--eval_steps=3", "--eval_on_start=False", "--keep_checkpoints=True", *FAST]
    checkpoints = project / "run" / "checkpoints"
    kill_at_first_checkpoint(SCRIPT, [*args[2:], "--output_dir=run"], project, checkpoints)
    assert not (project / "run" / "run_config.json").exists()
    half = checkpoints / "checkpoint-999"                # what a kill during a save leaves behind
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"partial")

    result = run_stage(SCRIPT, *args[2:], "--output_dir=run", root=project)
    assert "resuming from checkpoint-" in result.stdout
    run_stage(SCRIPT, *args[2:], "--output_dir=whole", root=project)
    resumed, whole = project / "run", project / "whole"
    assert files_under(resumed) - files_under(whole) == set()
    assert {"chat_template.jinja", *CONTRACT} <= files_under(resumed)
    metrics = json.loads((resumed / "train_metrics.json").read_text())
    reference = json.loads((whole / "train_metrics.json").read_text())
    start = metrics["resumed_from_step"]
    assert start >= 3 and metrics["global_step"] == reference["global_step"] == 12
    assert [e["step"] for e in metrics["evals"]] == [3, 6, 9, 12]
    assert metrics["best_step"] == reference["best_step"]
    untimed = [[{k: v for k, v in e.items() if not k.endswith("_seconds")} for e in m["evals"]]
               for m in (metrics, reference)]
    assert untimed[0] == untimed[1]                      # validation loss and ROUGE of every evaluation
    later = [p for p in reference["loss_curve"] if p["step"] > start + FAST_LOGGING_STEPS]   # full logging windows
    assert later and [p for p in metrics["loss_curve"] if p["step"] > start + FAST_LOGGING_STEPS] == later
    for adapter in ("adapter_model.safetensors", "checkpoints/checkpoint-12/adapter_model.safetensors"):
        mine, theirs = load_file(resumed / adapter), load_file(whole / adapter)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), adapter
    record = json.loads((resumed / "run_config.json").read_text())
    assert record["family"] == CAUSAL and record["prompt_style"] == "chat_template"
    assert record["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    loaded = load_model(str(resumed))
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


def spec_for(family: str, max_input: int = 128, max_target: int = 32) -> encoding.EncodingSpec:
    return encoding.EncodingSpec(family, DEFAULT_INSTRUCTION, "", max_input, max_target)


def test_causal_rows_learn_only_the_summary_and_keep_eos(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models["llama"]), CAUSAL)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id      # the hard case: pad == eos
    long_dialogue = json.loads([line for line in SAMPLES.read_text().splitlines() if "sample-long-meeting" in line][0])
    row = encoding.encode_example(tokenizer, spec_for(CAUSAL), long_dialogue["dialogue"], "Short summary.")
    summary_ids = tokenizer("Short summary.", add_special_tokens=False)["input_ids"]
    target = [t for t in row["labels"] if t != -100]
    assert target == summary_ids + [tokenizer.eos_token_id]       # loss on summary + EOS only
    assert row["input_ids"][-len(target):] == target and row["input_ids"][-1] == tokenizer.eos_token_id
    prompt_length = len(row["input_ids"]) - len(target)
    assert prompt_length <= 128 and row["input_truncated"]        # the dialogue was cut, not the summary
    assert tokenizer.decode(row["input_ids"][:prompt_length]).endswith("<|im_start|>assistant\n")
    long = encoding.encode_example(tokenizer, spec_for(CAUSAL, max_target=8), "A: hi\nB: hello",
                                   long_dialogue["summary"])
    kept = [t for t in long["labels"] if t != -100]
    assert len(kept) == 8 and kept[-1] == tokenizer.eos_token_id and long["target_truncated"]

    collate = encoding.make_collator(tokenizer, torch.device("cpu"))
    short = encoding.encode_example(tokenizer, spec_for(CAUSAL), "A: hi", "Hi.")
    batch = collate([{k: v for k, v in r.items() if k in ("input_ids", "attention_mask", "labels")}
                     for r in (row, short)])
    n = len(short["input_ids"])
    assert batch["labels"][1, n - 1] == tokenizer.eos_token_id    # EOS survives padding although pad == eos
    assert (batch["labels"][1, n:] == -100).all() and (batch["attention_mask"][1, n:] == 0).all()
    assert batch["input_ids"].shape[1] == len(row["input_ids"])   # padded to the longest row, on the right


def test_seq2seq_rows_use_text_target_labels(tiny_models):
    tokenizer = load_tokenizer(str(tiny_models["bart"]), SEQ2SEQ)
    row = encoding.encode_example(tokenizer, spec_for(SEQ2SEQ, max_input=64, max_target=6),
                                  "A: hello there\nB: hi", "Anna and Tom greet each other warmly today.")
    assert row["labels"][-1] == tokenizer.eos_token_id and len(row["labels"]) == 6 and row["target_truncated"]
    assert row["input_ids"][-1] == tokenizer.eos_token_id and not row["input_truncated"]


def test_tokenization_is_cached_by_settings(tiny_models, samples, tmp_path):
    tokenizer = load_tokenizer(str(tiny_models["llama"]), CAUSAL)
    rows = samples.select(range(6))
    spec = spec_for(CAUSAL, max_input=400, max_target=100)
    first, stats = encoding.tokenize_split(rows, tokenizer, spec, tmp_path, "train")
    again, stats_again = encoding.tokenize_split(rows, tokenizer, spec, tmp_path, "train")
    other, stats_other = encoding.tokenize_split(rows, tokenizer, spec_for(CAUSAL, max_input=96), tmp_path, "train")
    assert (stats["cache"], stats_again["cache"], stats_other["cache"]) == ("written", "reused", "written")
    assert first["input_ids"] == again["input_ids"] != other["input_ids"]
    edited = rows.map(lambda row, i: {"summary": row["summary"] + (" Changed." if i == 5 else "")}, with_indices=True)
    assert encoding.tokenize_split(edited, tokenizer, spec, tmp_path, "train")[1]["cache"] == "written"  # row 6 counts
    assert first.column_names == ["input_ids", "attention_mask", "labels"]
    assert len({len(ids) for ids in first["input_ids"]}) > 1       # no padding in map


def test_lora_targets_per_architecture(tiny_models):
    bart = load_model(str(tiny_models["bart"]), device="cpu").model
    llama = load_model(str(tiny_models["llama"]), device="cpu").model
    assert lora.resolve_target_modules(bart, None, SEQ2SEQ) == ["q_proj", "v_proj"]
    assert lora.resolve_target_modules(llama, None, CAUSAL) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora.resolve_target_modules(llama, "all-linear", CAUSAL) == "all-linear"
    assert lora.resolve_target_modules(llama, "gate_proj,up_proj", CAUSAL) == ["gate_proj", "up_proj"]
    with pytest.raises(UserError, match="TARGET_MODULES query not found in 'bart'; its linear modules are: fc1, fc2"):
        lora.resolve_target_modules(bart, ["query"], SEQ2SEQ)


def test_run_folder_resumes_only_complete_checkpoints_with_matching_settings(tmp_path):
    out = tmp_path / "out"
    cfg = {"LEARNING_RATE": 0.01, "RESUME": "auto", "OVERWRITE": False}
    plan = run_dir.plan_run(out, cfg, [], "auto", False)
    assert plan.resume_from is None and not plan.finished
    run_dir.prepare_run_dir(plan, cfg, [], keep_checkpoints=False)
    checkpoints = out / run_dir.CHECKPOINTS
    for step in (2, 4, 6):
        (checkpoints / f"checkpoint-{step}").mkdir()
        (checkpoints / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"x" * 10)
    run_dir.mark_complete(checkpoints / "checkpoint-2")
    run_dir.mark_complete(checkpoints / "checkpoint-6")
    (checkpoints / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"x" * 3)   # cut short
    assert run_dir.complete_checkpoints(checkpoints) == [checkpoints / "checkpoint-2"]

    plan = run_dir.plan_run(out, {**cfg, "RESUME": "never"}, [], "auto", False)      # RESUME is not a setting change
    assert plan.resume_from == checkpoints / "checkpoint-2"
    run_dir.prepare_run_dir(plan, cfg, [], keep_checkpoints=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "run_config.json"]

    with pytest.raises(UserError, match=r"unfinished run with other settings \(LEARNING_RATE 0.01 -> 0.1\)"):
        run_dir.plan_run(out, {**cfg, "LEARNING_RATE": 0.1}, [], "auto", False)
    plan = run_dir.plan_run(out, {**cfg, "LEARNING_RATE": 0.1}, [], "auto", True)
    assert plan.wipe
    run_dir.prepare_run_dir(plan, {**cfg, "LEARNING_RATE": 0.1}, [], keep_checkpoints=False)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["run_config.json"]

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not from train_bart_lora.py"):
        run_dir.plan_run(stranger, cfg, [], "auto", True)


def test_an_unfinished_run_without_a_checkpoint_or_that_failed_is_replaced(tmp_path, capsys):
    out = tmp_path / "out"
    cfg = {"LEARNING_RATE": 0.01}
    run_dir.prepare_run_dir(run_dir.plan_run(out, cfg, [], "auto", False), cfg, [], keep_checkpoints=False)
    # ... what a start that fails after its checks leaves: a record, no complete checkpoint
    plan = run_dir.plan_run(out, {"LEARNING_RATE": 0.001}, [], "auto", False)
    assert plan.wipe and not plan.resume_from
    assert "no complete checkpoint; settings changed: LEARNING_RATE 0.01 -> 0.001" in plan.note

    checkpoint = out / run_dir.CHECKPOINTS / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x" * 10)
    run_dir.mark_complete(checkpoint)
    with pytest.raises(UserError, match="holds an unfinished run with other settings"):
        run_dir.plan_run(out, {"LEARNING_RATE": 0.001}, [], "auto", False)   # a checkpoint is worth keeping

    run_dir.mark_failed(run_dir.RunPlan(out), "training stopped at optimizer step 3")
    plan = run_dir.plan_run(out, cfg, [], "auto", False)      # a run that stopped is replaced, same settings too
    assert plan.wipe and "it stopped: training stopped at optimizer step 3" in plan.note
    run_dir.prepare_run_dir(plan, cfg, [], keep_checkpoints=False)
    assert "replacing the unfinished run" in capsys.readouterr().out
    assert sorted(p.name for p in (out / run_dir.CHECKPOINTS).iterdir()) == ["run_config.json"]
    assert json.loads((out / run_dir.CHECKPOINTS / "run_config.json").read_text())["status"] == "unfinished"


def test_overwrite_removes_only_the_stages_own_files(tmp_path):
    out = tmp_path / "out"
    checkpoints = out / run_dir.CHECKPOINTS
    (checkpoints / "checkpoint-4").mkdir(parents=True)
    (checkpoints / "checkpoint-4" / "optimizer.pt").write_bytes(b"x")
    (checkpoints / "my_eval_notes.txt").write_text("mine")
    for name in ("adapter_model.safetensors", "train_metrics.json"):
        (out / name).write_text("old")
    (out / "notes.md").write_text("mine")
    (tmp_path / "escape.txt").write_text("outside")
    (out / "run_config.json").write_text(json.dumps({
        "stage": "train_bart_lora", "schema_version": 2, "config": {"LEARNING_RATE": 0.5},
        "files": ["adapter_model.safetensors", "train_metrics.json", "run_config.json", "../escape.txt", ".."]}))
    plan = run_dir.plan_run(out, {"LEARNING_RATE": 0.1}, [], "auto", True)
    run_dir.prepare_run_dir(plan, {"LEARNING_RATE": 0.1}, [], keep_checkpoints=False)
    assert files_under(out) == {"notes.md", "checkpoints/my_eval_notes.txt", "checkpoints/run_config.json"}
    assert (tmp_path / "escape.txt").read_text() == "outside" and (out / "notes.md").read_text() == "mine"


def test_the_epoch_order_depends_on_the_seed_and_the_epoch_only():
    lengths = [5 + (i * 37) % 60 for i in range(64)]
    sampler = trainer.EpochSeededLengthSampler(8, lengths, seed=42)
    sampler.set_epoch(1)
    first = list(sampler)
    torch.manual_seed(123)                      # the global RNG (what a resumed process cannot restore in time)
    torch.rand(10)
    again = trainer.EpochSeededLengthSampler(8, lengths, seed=42)
    again.set_epoch(1)
    assert list(again) == first and sorted(first) == list(range(64))
    again.set_epoch(2)
    assert list(again) != first
    assert max(lengths[i] for i in first[:8]) == max(lengths)   # still group_by_length: the longest batch first


def test_non_finite_values_are_found_in_the_loss_or_the_gradients():
    finite = [torch.ones(3), torch.zeros(2, 2)]
    assert trainer.nonfinite_problem(torch.tensor(0), finite) is None
    assert trainer.nonfinite_problem(torch.tensor(1), finite) == "loss"
    assert trainer.nonfinite_problem(torch.tensor(0), [torch.ones(3), torch.tensor([1.0, float("inf")])]) == "gradient"
    assert trainer.nonfinite_problem(torch.tensor(0), [torch.tensor([float("nan")])]) == "gradient"
    assert trainer.nonfinite_problem(torch.tensor(0), []) is None


def test_a_non_finite_loss_stops_with_one_line_and_the_corrected_command_replaces_the_run(tiny_models, project):
    from safetensors.torch import load_file, save_file
    broken = project / "models" / "nan-llama"
    shutil.copytree(tiny_models["llama"], broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    common = ["--max_steps=2", "--eval_steps=2", "--eval_on_start=False", "--output_dir=run", *FAST]

    result = run_stage(SCRIPT, f"--model={broken}", *common, root=project, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = error_line(result)
    assert "training stopped at optimizer step 1: the loss is not finite" in line
    assert "lower LEARNING_RATE (now 0.01)" in line and "check the training data" in line
    out = project / "run"
    assert not (out / "run_config.json").exists() and not list(out.glob("adapter_model*"))   # nothing "finished"
    record = json.loads((out / run_dir.CHECKPOINTS / "run_config.json").read_text())
    assert record["status"] == "failed" and record["failure"] == "training stopped at optimizer step 1"

    fixed = run_stage(SCRIPT, f"--model={tiny_models['llama']}", *common, root=project)   # no OVERWRITE needed
    assert "replacing the unfinished run" in fixed.stdout and "it stopped" in fixed.stdout
    assert files_under(out) == CONTRACT | {"chat_template.jinja"}


def test_a_start_that_fails_after_its_checks_does_not_block_the_corrected_command(tiny_models, tmp_path, monkeypatch,
                                                                                  capsys):
    from finetuneflow.train import steps

    def trainer_setup_fails(*args, **kwargs):
        raise RuntimeError("trainer setup failed")

    out = tmp_path / "run"
    common = [f"--model={tiny_models['bart']}", f"--output_dir={out}", f"--cache_dir={tmp_path / 'cache'}",
              "--max_steps=2", "--eval_steps=2", "--eval_on_start=False", *FAST]
    main = train_main()
    monkeypatch.setattr(steps, "build_trainer", trainer_setup_fails)
    with pytest.raises(RuntimeError, match="trainer setup failed"):
        main(common)
    assert files_under(out) == {"checkpoints/run_config.json"}
    monkeypatch.undo()
    metrics = main([*common, "--learning_rate=0.02"])           # corrected, without --OVERWRITE
    assert "replacing the unfinished run" in capsys.readouterr().out
    assert metrics["global_step"] == 2 and files_under(out) == CONTRACT


def test_replacing_a_run_killed_at_any_removal_leaves_a_folder_the_next_run_recognizes(tmp_path, monkeypatch):
    """Interrupt OVERWRITE's removals after each possible number of deletions: the folder always keeps
    this stage's record (so it is never taken for the user's), and a finished record never lists
    missing files (so it never reports a finished run that is not there)."""
    from finetuneflow.contract.safety import check_output_dir
    original_unlink = Path.unlink

    class Killed(BaseException):
        pass

    for allowed in range(0, 40):
        out = tmp_path / f"out{allowed}"
        (out / run_dir.CHECKPOINTS / "checkpoint-4").mkdir(parents=True)
        (out / run_dir.CHECKPOINTS / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"x")
        run_dir.mark_complete(out / run_dir.CHECKPOINTS / "checkpoint-4")
        files = ["adapter_model.safetensors", "adapter_config.json", "train_metrics.json", "loss_curve.png"]
        for name in files:
            (out / name).write_text("old")
        (out / "run_config.json").write_text(json.dumps({"stage": "train_bart_lora", "schema_version": 2,
                                                         "config": {"LEARNING_RATE": 0.5},
                                                         "files": [*files, "run_config.json"]}))
        calls = []

        def unlink(self, missing_ok=False, _calls=calls, _allowed=allowed):
            if len(_calls) >= _allowed:
                raise Killed()
            _calls.append(self)
            return original_unlink(self, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", unlink)
        try:
            run_dir.prepare_run_dir(run_dir.plan_run(out, {"LEARNING_RATE": 0.1}, [], "auto", True),
                                    {"LEARNING_RATE": 0.1}, [], keep_checkpoints=False)
            finished = True
        except Killed:
            finished = False
        monkeypatch.setattr(Path, "unlink", original_unlink)
        check_output_dir(out, stage="train_bart_lora", overwrite=True,
                         markers=("run_config.json", "checkpoints/run_config.json"))   # still this stage's folder
        record = out / "run_config.json"
        if record.exists():
            assert all((out / name).exists() for name in json.loads(record.read_text())["files"])
        if finished:
            assert allowed > 3 and files_under(out) == {"checkpoints/run_config.json"}
            break
    else:
        raise AssertionError("prepare_run_dir never finished")


# ----------------------------------------------------------------------------- precision, evaluations, selection

def test_precision_is_autocast_where_it_pays_and_explicit_requests_fail_with_one_line(monkeypatch):
    from finetuneflow.model import precision as P
    cpu = torch.device("cpu")
    monkeypatch.setenv("FTF_CPU_BF16", "1")
    resolve = P.resolve_training_precision
    assert resolve("auto", cpu, CAUSAL, False, 135_000_000).mode == "bf16"
    assert resolve("auto", cpu, SEQ2SEQ, False, 400_000_000).mode == "fp32"     # not measured
    assert resolve("auto", cpu, CAUSAL, True, 135_000_000).mode == "fp32"       # 4-bit on a CPU
    assert resolve("auto", cpu, CAUSAL, False, 60_000).mode == "fp32"           # tiny: casts cost more
    assert resolve("bf16", cpu, SEQ2SEQ, False, 60_000).mode == "bf16"          # asked for: done
    assert resolve("fp32", cpu, CAUSAL, False, 135_000_000).mode == "fp32"
    assert "forced by FTF_CPU_BF16=1" in resolve("auto", cpu, CAUSAL, False, 135_000_000).reason
    with pytest.raises(UserError, match="--precision=fp16 needs a CUDA GPU"):
        resolve("fp16", cpu, CAUSAL, False)
    monkeypatch.setenv("FTF_CPU_BF16", "0")
    with pytest.raises(UserError, match=r"--precision=bf16: this CPU is treated as having no native bf16 \(forced by "
                                        r"FTF_CPU_BF16=0\).*--precision=fp32 or auto"):
        resolve("bf16", cpu, CAUSAL, False)
    fallback = resolve("auto", cpu, CAUSAL, False, 135_000_000)   # only auto falls back
    assert fallback.mode == "fp32" and "no native bf16" in fallback.reason
    monkeypatch.delenv("FTF_CPU_BF16")
    monkeypatch.setattr(P, "_detected_feature", lambda: None)                    # detected, not forced
    with pytest.raises(UserError, match=r"--precision=bf16: this CPU has no native bf16 .*--precision=fp32 or auto"):
        resolve("bf16", cpu, CAUSAL, False)


def test_family_decoding_defaults_are_the_seeds_for_seq2seq_and_from_the_data_for_causal():
    from finetuneflow.contract.decoding import GenerationSettings
    from finetuneflow.train import evaluation as E
    unset = GenerationSettings(None, None, None, None, 1.0)
    seq2seq, sources = E.resolve_generation(SEQ2SEQ, unset, [30] * 10, 192)
    assert (seq2seq.num_beams, seq2seq.max_new_tokens, seq2seq.length_penalty) == (4, 192, 1.0)
    assert set(sources) == {"num_beams", "max_new_tokens"}
    lengths = list(range(10, 50))                                   # 95th percentile 47.05 -> x1.25 = 58.8 -> 64
    causal, sources = E.resolve_generation(CAUSAL, unset, lengths, 192)
    assert (causal.num_beams, causal.max_new_tokens) == (1, 64) and "greedy" in sources["num_beams"]
    assert "95th percentile of the 40 training summaries' tokens (47)" in sources["max_new_tokens"]
    assert E.resolve_generation(CAUSAL, unset, lengths, 48)[0].max_new_tokens == 48      # never past the targets
    assert E.resolve_generation(CAUSAL, unset, [3, 4], 192)[0].max_new_tokens == 16      # at least 16
    given = GenerationSettings(2, 20, None, 3, 1.0)
    assert E.resolve_generation(CAUSAL, given, lengths, 192) == (given, {})
    with pytest.raises(UserError, match="MIN_NEW_TOKENS=80 is more than MAX_NEW_TOKENS=64"):
        E.resolve_generation(CAUSAL, GenerationSettings(None, None, 80, None, 1.0), lengths, 192)


def test_the_evaluation_subset_is_length_stratified_fixed_and_every_prefix_spans_the_lengths():
    from finetuneflow.train import evaluation as E
    lengths = [(i * 37) % 100 for i in range(100)]                  # a permutation of 0..99
    order = E.stratified_order(lengths, 10, seed=42)
    assert order == E.stratified_order(lengths, 10, seed=42) != E.stratified_order(lengths, 10, seed=7)
    assert sorted(lengths[i] // 10 for i in order) == list(range(10))   # one row per decile
    first4 = sorted(lengths[i] for i in order[:4])
    assert first4[0] < 30 and first4[-1] >= 70                        # a prefix spans short and long rows
    assert sorted(E.stratified_order(lengths, 0, 42)) == list(range(100))      # 0 = every row
    assert sorted(E.stratified_order(lengths, 500, 42)) == list(range(100))
    assert E.spread_order(5) == [0, 2, 1, 3, 4] and sorted(E.spread_order(13)) == list(range(13))


def test_the_first_evaluation_stops_at_the_budget_and_fixes_the_rows_of_every_later_one(monkeypatch):
    from finetuneflow.contract.decoding import GenerationSettings
    from finetuneflow.train import evaluation as E
    clock = [0.0]
    monkeypatch.setattr(E.time, "perf_counter", lambda: clock[0])
    calls = []

    def summarize_rows(positions, seconds_per_row=1.0):
        calls.append(list(positions))
        clock[0] += seconds_per_row * len(positions)
        return [f"summary {p}" for p in positions], [5] * len(positions)

    spec = E.GenerationEval([f"d{i}" for i in range(20)], [f"r{i}" for i in range(20)], GenerationSettings(),
                            batch_size=4, max_input_length=64, instruction="", family=CAUSAL, base="m", tokenizer=None,
                            budget_seconds=10)
    first = E.generate_rows(spec, summarize_rows, fixed_rows=None)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7]] and first.rows == 8 and first.budget_stopped   # a 3rd: 12 s
    assert first.summaries == [f"summary {p}" for p in range(8)] and first.generated_tokens == 40
    calls.clear()
    later = E.generate_rows(spec, lambda p: summarize_rows(p, 3.0), fixed_rows=first.rows)   # slower, same rows
    assert calls == [list(range(8))] and later.rows == 8 and not later.budget_stopped and later.seconds == 24
    calls.clear()
    # two processes: each generates its share of every round, the decision is shared
    shares = E.generate_rows(spec, summarize_rows, fixed_rows=None, rank=1, world=2)
    assert calls[0] == [1, 3, 5, 7] and shares.rows in (8, 16)
    unlimited = E.GenerationEval(**{**spec.__dict__, "budget_seconds": 0})
    calls.clear()
    assert E.generate_rows(unlimited, summarize_rows, fixed_rows=None).rows == 20 and len(calls) == 1


def test_faithfulness_steers_selection_only_where_the_check_was_validated():
    from finetuneflow.train import evaluation as E
    chat = "#Person1#: Can we meet at 3 pm on Friday?\n#Person2#: Yes, see you at the cafe."
    assert E.rate_is_selectable([chat] * 3)[0]
    meeting = "\n".join(f"Speaker A: point number {i} about the budget and the plan" for i in range(80))
    usable, why = E.rate_is_selectable([meeting] * 3)
    assert not usable and "over the 515 words" in why
    rate, readable = E.unsupported_mention_rate(["They meet at 3 pm on Friday.", "They meet at 5 pm on Monday.", ""],
                                                [chat, chat, chat])
    assert (rate, readable) == (0.5, 2)                                 # the empty summary cannot be read


def test_checkpoint_selection_rules():
    from finetuneflow.train.selection import Evaluation, evaluations, select
    history = [Evaluation(0, 40.0, 0.0), Evaluation(10, 30.0, 0.30), Evaluation(20, 28.0, 0.10),
               Evaluation(30, 29.0, 0.12), Evaluation(40, 27.0, 0.20)]
    assert select(history, "rougeL").best_step == 10                    # the zero-shot evaluation never counts
    faithful = select(history, "rougeL_faithful", 0.05)
    assert faithful.best_step == 30 and faithful.eligible == [20, 30] and faithful.threshold == pytest.approx(0.15)
    assert faithful.keep == {20, 30}                                   # both may still become the best
    # the best moves back to an earlier, kept checkpoint when a later one lowers the lowest rate
    moved = select([*history, Evaluation(50, 20.0, 0.06)], "rougeL_faithful", 0.05)
    assert moved.best_step == 20 and moved.keep == {20, 50}
    assert select(history[:3], "rougeL_faithful", 0.5).best_step == 10     # a wide margin: plain ROUGE-L
    unrated = select([Evaluation(5, 10.0), Evaluation(10, 12.0)], "rougeL_faithful", 0.05)
    assert unrated.best_step == 10 and "selected on ROUGE-L" in unrated.note
    ties = select([Evaluation(5, 10.0, 0.2), Evaluation(10, 10.0, 0.1)], "rougeL_faithful", 0.5)
    assert ties.best_step == 10 and ties.keep == {10}                   # same ROUGE-L: the lower rate wins
    logged = [{"eval_rougeL": 1.0, "step": 0}, {"loss": 3.0, "step": 4},
              {"eval_rougeL": 2.0, "eval_unsupported_mention_rate": 0.25, "step": 8}]
    assert evaluations(logged) == [Evaluation(0, 1.0, None), Evaluation(8, 2.0, 0.25)]


def test_settings_added_later_are_not_part_of_an_old_runs_identity(tmp_path):
    old = {"LEARNING_RATE": 0.01, "NUM_BEAMS": 4, "MAX_NEW_TOKENS": 192}       # a record made before they existed
    new = {**old, "NUM_BEAMS": None, "MAX_NEW_TOKENS": None, "PRECISION": "auto", "SELECT_ON": "rougeL",
           "EVAL_BUDGET_SECONDS": 120, "REPORT_TO": "auto"}
    same = run_dir.run_identity(old, {}), run_dir.run_identity(new, {})
    assert run_dir.identity_differences(*same) == []
    changed = run_dir.run_identity({**new, "PRECISION": "fp32"}, {})
    assert run_dir.identity_differences(run_dir.run_identity(new, {}), changed) == ["PRECISION 'auto' -> 'fp32'"]
    assert run_dir.identity_differences(run_dir.run_identity(new, {}),
                                        run_dir.run_identity({**new, "REPORT_TO": "none"}, {})) == []


def tensorboard_scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def test_bf16_training_with_tensorboard_and_mlflow_logs_the_same_metrics_and_keeps_fp32_weights(tiny_models, project):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from safetensors.torch import load_file
    # bf16 autocast runs on any CPU (emulated without native bf16): FTF_CPU_BF16=1 lets --precision=bf16 through
    result = run_stage(SCRIPT, f"--model={tiny_models['llama']}", "--max_steps=4", "--eval_steps=2", "--precision=bf16",
                       "--report_to=tensorboard,mlflow", "--select_on=rougeL_faithful", "--output_dir=run", *FAST,
                       root=project,
                       env={"MLFLOW_TRACKING_URI": "", "TENSORBOARD_LOGGING_DIR": "", "FTF_CPU_BF16": "1"})
    assert "precision: bf16 autocast (fp32 weights and optimizer)" in result.stdout
    assert "evaluation at step 2:" in result.stdout and "best so far: step" in result.stdout
    out = project / "run"
    record = json.loads((out / "run_config.json").read_text())
    assert record["precision"]["requested"] == record["precision"]["mode"] == "bf16"
    assert "asked for" in record["precision"]["reason"]
    assert {t.dtype for t in load_file(out / "adapter_model.safetensors").values()} == {torch.float32}
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["precision"] == "bf16" and metrics["selection"]["select_on"] == "rougeL_faithful"
    assert all(e["unsupported_mention_rate"] is None or 0 <= e["unsupported_mention_rate"] <= 1
               for e in metrics["evals"])
    [events] = list((project / "runs" / "tensorboard").iterdir())
    scalars = tensorboard_scalars(events)
    from_tensorboard = {tag.replace("train/", "", 1).replace("eval/", "eval_", 1) for tag in scalars}
    store = project / "runs" / "mlflow"
    from_mlflow = {p.name for p in store.glob("*/*/metrics/*")}
    assert {"loss", "eval_loss", "eval_rougeL", "eval_generation_seconds", "eval_generated_rows"} <= from_mlflow
    assert from_mlflow == from_tensorboard, from_mlflow ^ from_tensorboard   # the same metrics in each tracker
    assert scalars["eval/rougeL"] == [e["rougeL"] for e in metrics["evals"]]


def test_every_in_training_evaluation_generates_what_a_fresh_model_with_its_weights_generates(tiny_models, tmp_path,
                                                                                              monkeypatch):
    """The weights change between evaluations, so nothing the generation backend keeps per model
    object (the prompt prefix's KV cache) may carry over from one evaluation to the next."""
    import copy
    from finetuneflow.train import trainer_core
    original, compared = trainer_core.summarize, []

    def checked(loaded, dialogues, *args, **kwargs):
        result = original(loaded, dialogues, *args, **kwargs)
        fresh = copy.copy(loaded)
        fresh.model = copy.deepcopy(loaded.model)        # a new object: no state of earlier calls
        compared.append((result.summaries, original(fresh, dialogues, *args, **kwargs).summaries))
        return result

    monkeypatch.setattr(trainer_core, "summarize", checked)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_main()([f"--model={tiny_models['llama']}", "--max_steps=2", "--eval_steps=1", *FAST,
                      "--learning_rate=0.05", f"--output_dir={tmp_path / 'run'}", f"--cache_dir={tmp_path / 'cache'}"])
    finally:
        torch.set_num_threads(threads)
    assert len(compared) == 3 and all(during == fresh for during, fresh in compared)
    assert compared[0][0] != compared[-1][0]                 # the weights did change what is generated
