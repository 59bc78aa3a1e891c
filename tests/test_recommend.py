"""recommend_finetune.py and finetuneflow/plan (shapes, memory, planning, launch): the memory formula
decides the method for several GPU sizes, the seed's published ranking gives a T4 plan, the
planner's LoRA targets are the trainer's, bad input is one clear line, generated scripts are inert
for hostile model names, and the generated launch script really trains the tiny model."""
from __future__ import annotations

import csv
import json
import shlex
import sys
from pathlib import Path

import pytest

from conftest import REPO, SAMPLES, error_line, files_under, run_stage
from finetuneflow.plan import hardware
from finetuneflow.plan.memory import Workload, estimate_memory
from finetuneflow.plan.shapes import shape_from_row

FIXTURE = Path(__file__).parent / "fixtures" / "seed_ranking.csv"   # the seed's published T4 benchmark table,
# with each model's real parameter count and architecture from its config (the seed's table has no sizes)
HEADER = ["rank", "model", "kind", "status", "rougeL", "composite", "samples_per_s", "parameters", "family",
          "model_type", "hidden_size", "encoder_layers", "decoder_layers", "vocab_size", "device", "source"]
BART = ["1", "bart-large-cnn", "model", "ok", "21.1", "0.9", "1.97", "406290432", "seq2seq", "bart", "1024", "12",
        "12", "50264", "Tesla T4", "facebook/bart-large-cnn"]
LLAMA_3B = ["2", "llama-3b", "model", "ok", "17.3", "0.5", "0.27", "3212749824", "causal", "llama", "3072", "0", "28",
            "128256", "Tesla T4", "meta-llama/Llama-3.2-3B-Instruct"]


def write_ranking(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([HEADER, *rows])
    return path


def recommend(tmp_path: Path, *args: str) -> dict:
    """main() in-process (fast); every path explicit so nothing lands in the repository."""
    import recommend_finetune
    out = tmp_path / "plan"
    return recommend_finetune.main([f"--ranking={tmp_path / 'ranking.csv'}", f"--output_dir={out}", "--overview=",
                                    "--top_k=5", *args])


def by_model(result: dict) -> dict:
    return {p["model"]: p for p in result["recommendations"]}


@pytest.mark.parametrize("gpu, memory, bart_methods, llama_3b_method", [
    ("T4", 16, {"lora", "full"}, "qlora"),       # 3B in 16-bit + Llama's 128k-vocabulary logits overflow 12.8 GB
    ("A10", 24, {"lora", "full"}, "lora"),
    ("A100", 40, {"lora", "full"}, "lora"),
])
def test_method_follows_the_memory_formula(tmp_path, gpu, memory, bart_methods, llama_3b_method):
    write_ranking(tmp_path / "ranking.csv", [BART, LLAMA_3B])
    plans = by_model(recommend(tmp_path, f"--gpu_name={gpu}", f"--gpu_memory_gb={memory}"))
    budget = 0.8 * memory
    bart, llama = plans["bart-large-cnn"], plans["llama-3b"]
    assert bart["method"] == "lora" and bart["fits"]
    assert {m for m in ("lora", "full") if bart["memory"][m]["total"] <= budget} == bart_methods
    assert llama["method"] == llama_3b_method and llama["fits"]
    assert llama["parameters"] == 3212749824 and bart["parameters"] == 406290432
    # the choice is the formula's: the first of LoRA, QLoRA (each without, then with checkpointing) that fits
    first_fit = next(t for t in llama["search"] if t["total_gb"] <= budget)
    assert (first_fit["method"], first_fit["micro_batch"]) == (llama["method"], llama["micro_batch"])
    assert all(t["total_gb"] > budget for t in llama["search"][:-1])
    if llama_3b_method == "qlora":
        assert llama["memory"]["lora"]["total"] > budget >= llama["memory"]["qlora"]["total"]
    assert llama["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and llama["lora"]["r"] == 16
    assert bart["lora"]["target_modules"] == ["q_proj", "v_proj"] and bart["lora"]["r"] == 8


def test_small_gpu_halves_the_batch_or_says_it_does_not_fit(tmp_path):
    write_ranking(tmp_path / "ranking.csv", [BART, LLAMA_3B])
    plans = by_model(recommend(tmp_path, "--gpu_name=T4", "--gpu_memory_gb=4"))
    assert plans["bart-large-cnn"]["fits"] and plans["bart-large-cnn"]["micro_batch"] <= 4
    llama = plans["llama-3b"]
    assert not llama["fits"] and "fits on: T4" in llama["needs"] and "script" not in llama
    assert llama["search"][-1]["micro_batch"] == 1


def test_memory_formula_parts():
    shape = shape_from_row(dict(zip(HEADER, LLAMA_3B)))
    work = Workload(768, 192, 16, ("q_proj", "v_proj"))
    lora = estimate_memory(shape, "lora", 4, work, "cuda", True)
    full = estimate_memory(shape, "full", 4, work, "cuda", True)
    assert full["weights"] == pytest.approx(4 * 3.2127, abs=0.01)
    assert full["optimizer"] == pytest.approx(8 * 3.2127, abs=0.01)
    p_lora = 16 * 28 * 2 * (3072 + 3072)   # r x layers x (q_proj, v_proj) x (in + out), ranking-based shape
    assert lora["trainable_parameters"] == p_lora
    assert lora["weights"] == pytest.approx((2 * 3212749824 + 4 * p_lora) / 1e9, abs=0.01)
    assert lora["optimizer"] == pytest.approx(8 * p_lora / 1e9, abs=0.01)
    assert lora["logits"] == pytest.approx(4 * 960 * 128256 * 10 / 1e9, abs=0.01)
    no_ckpt = estimate_memory(shape, "lora", 4, work, "cuda", False)
    assert no_ckpt["activations"] > 5 * lora["activations"]
    assert hardware.match_gpu("Tesla T4") == "T4" and hardware.match_gpu("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert hardware.match_gpu("NVIDIA A10G") == "A10" and hardware.match_gpu("NVIDIA H100 80GB HBM3") == "H100"


def test_seed_ranking_on_a_t4_plans_bart_and_llama_1b(project):
    result = run_stage("recommend_finetune.py", f"--ranking={FIXTURE}", "--gpu_name=T4", "--gpu_memory_gb=16",
                       root=project)
    out = project / "outputs" / "benchmarks"
    assert files_under(out) == {"recommendations.json", "finetune_plan.md", "train_bart-large.sh",
                                "train_llama-1b.sh", "recommend_finetune.run_config.json"}
    data = json.loads((out / "recommendations.json").read_text())
    plans = data["recommendations"]
    assert [p["model"] for p in plans] == ["BART-large", "LLaMA-1B"]
    for plan in plans:
        assert plan["fits"] and plan["method"] in ("lora", "qlora")
        assert plan["memory"][plan["method"]]["total"] <= plan["budget_gb"] == 12.8
        assert plan["time"]["available"] and plan["time"]["label"].startswith("estimate")
        assert plan["time"]["speed_scale"] == 1.0 and plan["time"]["minutes_per_epoch"] > 0
    bart_time = plans[0]["time"]   # 2000 rows / (1.968 samples/s x 3.3) + 200 rows / 1.968 samples/s
    assert bart_time["minutes_per_epoch"] == pytest.approx(2000 / (1.968 * 3.3) / 60 + 200 / 1.968 / 60, abs=0.2)
    script = (out / "train_bart-large.sh").read_text()
    assert f"{shlex.quote(sys.executable)} -m accelerate.commands.launch " in script and "train_bart_lora.py" in script
    for flag in ("--MODEL=facebook/bart-large-cnn", "--BATCH_SIZE=4", "--GRAD_ACCUM=2", "--LORA_R=8",
                 "--TARGET_MODULES=q_proj,v_proj", "--LOAD_IN_4BIT=False", "--MAX_INPUT_LENGTH=768"):
        assert flag in script
    assert "--MODEL=meta-llama/Llama-3.2-1B-Instruct" in (out / "train_llama-1b.sh").read_text()
    plan_md = (out / "finetune_plan.md").read_text()
    assert "## 1. BART-large" in plan_md and "## 2. LLaMA-1B" in plan_md and "estimate" in plan_md
    assert "planning for T4" in result.stdout


def test_without_an_overview_the_benchmarks_data_settings_are_carried(tmp_path):
    """The benchmark read the user's CSV (its record beside the ranking): the plan passes the same
    columns, fractions and seed; another DATASET gets none of them (the trainer's defaults)."""
    write_ranking(tmp_path / "ranking.csv", [BART])
    config = {"DATASET": "data/my_dialogues.csv", "HUB_CONFIG": None, "DIALOGUE_COLUMN": "conversation",
              "SUMMARY_COLUMN": "notes", "ID_COLUMN": None, "VAL_FRACTION": 0.1, "TEST_FRACTION": 0.2, "SEED": 3}
    (tmp_path / "run_config.json").write_text(json.dumps({"stage": "benchmark_models", "dataset": config["DATASET"],
                                                          "config": config}))
    result = recommend(tmp_path, "--gpu_name=T4", "--gpu_memory_gb=16")
    assert result["dataset"] == "data/my_dialogues.csv"
    assert result["data_settings"] == {"DIALOGUE_COLUMN": "conversation", "SUMMARY_COLUMN": "notes",
                                       "VAL_FRACTION": 0.1, "TEST_FRACTION": 0.2, "SEED": 3}
    script = (tmp_path / "plan" / "train_bart-large-cnn.sh").read_text()
    assert "--DIALOGUE_COLUMN=conversation \\" in script and "--SEED=3 \\" in script
    assert "`DIALOGUE_COLUMN=conversation`" in (tmp_path / "plan" / "finetune_plan.md").read_text()
    other = recommend(tmp_path, "--gpu_name=T4", "--gpu_memory_gb=16", "--dataset=data/other.jsonl")
    assert other["data_settings"] == {}


def test_bad_inputs_are_one_clear_line(project, tmp_path):
    import recommend_finetune
    from finetuneflow.contract.errors import UserError
    with pytest.raises(UserError, match="benchmark_models.py"):
        recommend_finetune.main([f"--ranking={tmp_path / 'absent.csv'}", f"--output_dir={tmp_path / 'out'}"])
    only_failures = write_ranking(tmp_path / "bad.csv", [
        ["", "broken", "model", "error", "", "", "", "", "", "", "", "", "", "", "", "x/y"],
        ["", "lead-3", "reference", "ok", "20", "", "9999", "", "", "", "", "", "", "", "cpu", ""]])
    with pytest.raises(UserError, match="no successful model rows .2 rows: 1 failed, 1 reference"):
        recommend_finetune.main([f"--ranking={only_failures}", f"--output_dir={tmp_path / 'out'}"])
    gpu = run_stage("recommend_finetune.py", f"--ranking={FIXTURE}", "--gpu_name=RTX-9999", root=project, check=False)
    line = error_line(gpu)
    assert gpu.returncode == 2 and "unknown GPU_NAME 'RTX-9999'" in line and all(k in line for k in hardware.GPUS)
    assert not (project / "outputs" / "benchmarks" / "recommendations.json").exists()
    assert not (tmp_path / "out" / "recommendations.json").exists()


@pytest.mark.skipif(not (REPO / "train_bart_lora.py").is_file(), reason="train_bart_lora.py is not written yet")
def test_generated_script_trains_the_tiny_model(project, tiny_models):
    """The user's own CSV (columns `conversation`, `notes`) inspected with their split settings: the
    generated script trains on the same columns and makes the same split, with no flag added by hand."""
    rows = [json.loads(line) for line in SAMPLES.read_text().splitlines()]
    (project / "data").mkdir()
    with open(project / "data" / "my_dialogues.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["conversation", "notes"], *([r["dialogue"], r["summary"]] for r in rows)])
    run_stage("inspect_dataset.py", "--dataset=data/my_dialogues.csv", "--dialogue_column=conversation",
              "--summary_column=notes", "--test_fraction=0.2", "--seed=7", "--model=", root=project)
    ranking = write_ranking(project / "outputs" / "benchmarks" / "final_ranking.csv", [
        ["1", "tiny-llama", "model", "ok", "1.0", "1.0", "20", "", "", "", "", "", "", "", "cpu",
         str(tiny_models["llama"])]])
    planned = run_stage("recommend_finetune.py", f"--ranking={ranking}", root=project)
    assert "data settings from the dataset overview: DIALOGUE_COLUMN=conversation SUMMARY_COLUMN=notes" \
        in planned.stdout
    script = project / "outputs" / "benchmarks" / "train_tiny-llama.sh"
    for flag in (f"--MODEL={tiny_models['llama']}", "--DATASET=data/my_dialogues.csv", "--DIALOGUE_COLUMN=conversation",
                 "--SUMMARY_COLUMN=notes", "--TEST_FRACTION=0.2", "--VAL_FRACTION=0.1", "--SEED=7"):
        assert flag in script.read_text(), flag
    import os
    import subprocess
    from conftest import OFFLINE_ENV
    # the venv is not on PATH (a PEP 668 Python, a venv not activated): the script's own interpreter runs it
    env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(project), "PATH": "/usr/bin:/bin"}
    assert "exec accelerate" not in script.read_text()
    done = subprocess.run(["bash", str(script), "--TRAIN_SAMPLES=8", "--VAL_SAMPLES=4", "--MAX_STEPS=2",
                           "--EVAL_ON_START=False", "--MAX_NEW_TOKENS=8", "--CACHE_DIR="],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = project / "ft_outputs" / "tiny-llama_lora"
    assert {"adapter_config.json", "adapter_model.safetensors", "run_config.json"} <= files_under(adapter)
    record = json.loads((adapter / "run_config.json").read_text())
    assert record["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    split = record["split"]
    assert split["source"] == "data/my_dialogues.csv" and split["columns"]["summary"] == "notes"
    assert (split["seed"], split["val_fraction"], split["test_fraction"]) == (7, 0.1, 0.2)


# ----------------------------------------------------------------------------- one table of LoRA targets
def small_config(name: str):
    """A small config of each architecture family the planner must get right."""
    import transformers as tf
    if name == "bart":
        return tf.BartConfig(vocab_size=120, d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                             max_position_embeddings=64)
    if name == "t5":
        return tf.T5Config(vocab_size=120, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=1,
                           num_heads=2)
    if name == "llama":
        return tf.LlamaConfig(vocab_size=120, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    if name == "phi3":
        return tf.Phi3Config(vocab_size=120, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return tf.GPT2Config(vocab_size=120, n_embd=16, n_layer=2, n_head=2, n_positions=64)


def trainer_default_targets(model, family: str):
    """What the trainer picks when TARGET_MODULES is left at None (its resolver, wherever the
    training package keeps it)."""
    import importlib
    import pkgutil
    import finetuneflow.train as train
    for info in pkgutil.iter_modules(train.__path__):
        resolve = getattr(importlib.import_module(f"finetuneflow.train.{info.name}"), "resolve_target_modules", None)
        if resolve is not None:
            return resolve(model, None, family)
    pytest.skip("the training package has no resolve_target_modules")


TARGETS = {"bart": ["q_proj", "v_proj"], "t5": ["q", "v"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "phi3": ["qkv_proj", "o_proj"], "gpt2": ["c_attn"]}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_planner_targets_are_the_trainers(name):
    """planning picks the targets the trainer will: from the model's real layers (config), from the
    ranking's model type alone (offline), and the trainer itself on the same model."""
    from finetuneflow.contract import architectures as arch
    from finetuneflow.plan.model_facts import architecture_columns, linear_layers
    from finetuneflow.plan.shapes import build_on_meta, default_targets, shape_from_config
    config = small_config(name)
    shape = shape_from_config(config)
    assert default_targets(shape) == TARGETS[name]
    row = {"model": name, "parameters": shape.parameters, **architecture_columns(config)}
    assert default_targets(shape_from_row(row)) == TARGETS[name]
    model = build_on_meta(config)
    assert arch.default_lora_targets(shape.family, config.model_type, linear_layers(model)[1]) == TARGETS[name]
    assert trainer_default_targets(model, shape.family) == TARGETS[name]
    # the ranking-based shape counts the same LoRA parameters for these targets as the real layers
    assert shape_from_row(row).lora_parameters(TARGETS[name], 8) == shape.lora_parameters(TARGETS[name], 8)


def test_ranking_facts_match_the_planners_for_the_same_model(tiny_models):
    """The benchmark measures the loaded model, the planner builds it on the meta device: same numbers."""
    from finetuneflow.model.loading import load_model
    from finetuneflow.plan.measuring import model_size
    from finetuneflow.plan.model_facts import architecture_columns
    from finetuneflow.plan.shapes import shape_for
    for folder in tiny_models.values():
        loaded = load_model(str(folder), device="cpu")
        measured = {**model_size(loaded), **architecture_columns(loaded.config)}
        shape, note = shape_for({"model": folder.name, "source": str(folder)})
        assert note.startswith("model config")
        assert (shape.parameters, shape.quantizable) == (measured["parameters"], measured["quantizable_parameters"])
        assert (shape.hidden_size, shape.encoder_layers, shape.decoder_layers, shape.vocab_size,
                shape.max_positions) == (measured["hidden_size"], measured["encoder_layers"],
                                         measured["decoder_layers"], measured["vocab_size"],
                                         measured["max_positions"])


def test_a_first_wave_ranking_folder_still_plans_and_is_replaced_with_overwrite(project):
    """A first-wave outputs/benchmarks (flat run_config.json, no file lists, no max_positions
    column) is read by recommend_finetune.py and owned by the same stages."""
    out = project / "outputs" / "benchmarks"
    write_ranking(out / "final_ranking.csv", [BART])
    (out / "predictions").mkdir()
    (out / "predictions" / "bart-large-cnn_predictions.csv").write_text("id,prediction\n1,x\n")
    (out / "run_config.json").write_text(json.dumps({"stage": "benchmark_models", "created": "2026-11-01T00:00:00",
                                                     "config": {}, "dataset": "data/my.jsonl", "split": "all rows"}))
    (out / "recommend_finetune.run_config.json").write_text(json.dumps({"stage": "recommend_finetune"}))
    (out / "train_old-model.sh").write_text("# a first-wave plan\n")
    result = run_stage("recommend_finetune.py", "--gpu_name=T4", root=project)
    assert "data data/my.jsonl" in result.stdout   # the first-wave record's dataset
    assert not (out / "train_old-model.sh").exists() and (out / "train_bart-large-cnn.sh").exists()
    refused = run_stage("benchmark_models.py", "--models=lead-3", f"--dataset={SAMPLES}", "--split=all",
                        "--n_samples=2", "--bertscore_model=", root=project, check=False)
    assert refused.returncode == 2 and "pass --OVERWRITE=True" in error_line(refused)
    run_stage("benchmark_models.py", "--models=lead-3", f"--dataset={SAMPLES}", "--split=all", "--n_samples=2",
              "--bertscore_model=", "--overwrite=True", root=project)
    assert files_under(out / "predictions") == {"lead-3_predictions.csv"}
    assert (out / "train_bart-large-cnn.sh").exists()   # the plan is recommend_finetune.py's: kept
