"""recommend_finetune.py and finetuneflow/planning.py: the memory formula decides the method for
several GPU sizes, the seed's published ranking gives a T4 plan, bad input is one clear line, and
the generated launch script really trains the tiny model."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import REPO, SAMPLES, error_line, files_under, run_stage
from finetuneflow.plan import planning

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
    shape = planning.shape_from_row(dict(zip(HEADER, LLAMA_3B)))
    lora = planning.estimate_memory(shape, "lora", 4, 768, 192, 16, ["q_proj", "v_proj"], "cuda", True)
    full = planning.estimate_memory(shape, "full", 4, 768, 192, 16, ["q_proj", "v_proj"], "cuda", True)
    assert full["weights"] == pytest.approx(4 * 3.2127, abs=0.01) and full["optimizer"] == pytest.approx(8 * 3.2127, abs=0.01)
    p_lora = 16 * 28 * 2 * (3072 + 3072)   # r x layers x (q_proj, v_proj) x (in + out), ranking-based shape
    assert lora["trainable_parameters"] == p_lora
    assert lora["weights"] == pytest.approx((2 * 3212749824 + 4 * p_lora) / 1e9, abs=0.01)
    assert lora["optimizer"] == pytest.approx(8 * p_lora / 1e9, abs=0.01)
    assert lora["logits"] == pytest.approx(4 * 960 * 128256 * 10 / 1e9, abs=0.01)
    no_ckpt = planning.estimate_memory(shape, "lora", 4, 768, 192, 16, ["q_proj", "v_proj"], "cuda", False)
    assert no_ckpt["activations"] > 5 * lora["activations"]
    assert planning.match_gpu("Tesla T4") == "T4" and planning.match_gpu("NVIDIA A100-SXM4-80GB") == "A100-80GB"
    assert planning.match_gpu("NVIDIA A10G") == "A10" and planning.match_gpu("NVIDIA H100 80GB HBM3") == "H100"


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
    assert "accelerate launch" in script and "train_bart_lora.py" in script
    for flag in ("--MODEL=facebook/bart-large-cnn", "--BATCH_SIZE=4", "--GRAD_ACCUM=2", "--LORA_R=8",
                 "--TARGET_MODULES=q_proj,v_proj", "--LOAD_IN_4BIT=False", "--MAX_INPUT_LENGTH=768"):
        assert flag in script
    assert "--MODEL=meta-llama/Llama-3.2-1B-Instruct" in (out / "train_llama-1b.sh").read_text()
    plan_md = (out / "finetune_plan.md").read_text()
    assert "## 1. BART-large" in plan_md and "## 2. LLaMA-1B" in plan_md and "estimate" in plan_md
    assert "planning for T4" in result.stdout


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
    assert gpu.returncode == 2 and "unknown GPU_NAME 'RTX-9999'" in line and all(k in line for k in planning.GPUS)
    assert not (project / "outputs" / "benchmarks" / "recommendations.json").exists()
    assert not (tmp_path / "out" / "recommendations.json").exists()


@pytest.mark.skipif(not (REPO / "train_bart_lora.py").is_file(), reason="train_bart_lora.py is not written yet")
def test_generated_script_trains_the_tiny_model(project, tiny_models):
    ranking = write_ranking(project / "outputs" / "benchmarks" / "final_ranking.csv", [
        ["1", "tiny-llama", "model", "ok", "1.0", "1.0", "20", "", "", "", "", "", "", "", "cpu", str(tiny_models["llama"])]])
    run_stage("recommend_finetune.py", f"--ranking={ranking}", f"--dataset={SAMPLES}", root=project)
    script = project / "outputs" / "benchmarks" / "train_tiny-llama.sh"
    assert f"--MODEL={tiny_models['llama']}" in script.read_text()
    import os
    import subprocess
    from conftest import OFFLINE_ENV
    env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(project)}
    done = subprocess.run(["bash", str(script), "--TRAIN_SAMPLES=8", "--VAL_SAMPLES=4", "--MAX_STEPS=2",
                           "--EVAL_ON_START=False", "--MAX_NEW_TOKENS=8", "--CACHE_DIR="],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = project / "ft_outputs" / "tiny-llama_lora"
    assert {"adapter_config.json", "adapter_model.safetensors", "run_config.json"} <= files_under(adapter)
    record = json.loads((adapter / "run_config.json").read_text())
    assert record["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
