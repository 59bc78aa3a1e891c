"""Turn the benchmark ranking and a GPU into a fine-tuning plan and a ready-to-run command.

Reads:  RANKING (benchmark_models.py's final_ranking.csv), OVERVIEW (inspect_dataset.py's
        dataset_overview.json, optional: p99 token lengths), each model's config (local folder or Hub)
Writes: OUTPUT_DIR/recommendations.json        per model: size, memory estimates, method, hyperparameters, time
        OUTPUT_DIR/finetune_plan.md            the same for humans, with the reasoning
        OUTPUT_DIR/train_<model>.sh            `accelerate launch train_bart_lora.py --NAME=value ...`
        OUTPUT_DIR/recommend_finetune.run_config.json

Run as:
    python recommend_finetune.py                                  # plan for this machine's GPU (or CPU)
    python recommend_finetune.py --gpu_name=T4 --gpu_memory_gb=16 # plan for a Colab T4
    bash outputs/benchmarks/train_bart-large-cnn.sh               # then train (extra --NAME=value pass through)
Model size is the real parameter count from the model's config (built on the meta device, no
download of weights); when the config cannot be loaded (offline, gated) the ranking's columns are
used. The memory formula, the method choice and the time scaling are documented in
finetuneflow/planning.py; times are estimates (expect within ~2x).
"""
RANKING = "outputs/benchmarks/final_ranking.csv"  # benchmark_models.py's ranking
TOP_K = 2                              # [int >= 1] plan the best K successful models
GPU_NAME = ""                          # plan for this GPU: T4, L4, A10, A100, A100-80GB, H100, H200; "" = this machine
GPU_MEMORY_GB = None                   # [float > 0 | None] memory to plan with, GB; None = free memory detected, or the GPU's nominal
MEMORY_MARGIN = 0.8                    # [0 < float <= 1] share of the memory a plan may fill (the rest: fragmentation, spikes)
OVERVIEW = "metrics/dataset_overview.json"  # inspect_dataset.py output: p99 token lengths ("" = ignore)
DATASET = None                         # [str | None] training data for the script; None = the overview's, else the benchmark's
TRAIN_SAMPLES = 2000                   # [int >= 0] training rows (the seed's 2,000)
VAL_SAMPLES = 200                      # [int >= 0] validation rows evaluated each epoch
EPOCHS = 3                             # [float > 0] passes over the training rows
MICRO_BATCH = 4                        # [int >= 1] planned micro-batch; halved when nothing fits
EFFECTIVE_BATCH = 8                    # [int >= 1] micro-batch x gradient accumulation (the seed's 4 x 2)
MAX_INPUT_LENGTH = 768                 # [int >= 16] tokens when there is no overview (the seed's)
MAX_TARGET_LENGTH = 192                # [int >= 2] tokens when there is no overview (the seed's)
MAX_INPUT_CAP = 1024                   # [int >= 16] longest input the plan allows, whatever the p99
MAX_TARGET_CAP = 256                   # [int >= 2] longest summary the plan allows
TRAINER = "train_bart_lora.py"         # the stage the launch scripts run
OUTPUT_DIR = "outputs/benchmarks"      # where the plan and scripts go

import csv
import json
import math
import re
from pathlib import Path

from finetuneflow.plan import planning
from finetuneflow.contract.record import RunRecord, read_record, write_record
from finetuneflow.contract.settings import configure, declared_settings
from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.contract.io import atomic_write_json, atomic_write_text
from finetuneflow.contract.paths import output_dir, require, resolve

REPO = Path(__file__).resolve().parent


def read_candidates(path: Path, top_k: int) -> list[dict]:
    """The top_k successful model rows (reference baselines and failures skipped), best composite first."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    ok = [r for r in rows if (r.get("status") or "ok") == "ok" and (r.get("kind") or "model") == "model"]
    if not ok:
        errors = sum(r.get("status") == "error" for r in rows)
        raise UserError(f"{path} has no successful model rows ({len(rows)} rows: {errors} failed, "
                        f"{sum(r.get('kind') == 'reference' for r in rows)} reference baselines); fix the errors in its "
                        f"'error' column and re-run benchmark_models.py")
    ok.sort(key=lambda r: -(planning.number(r, "composite") or 0.0))
    return ok[:max(1, top_k)]


def trainer_flags(trainer: Path) -> set[str] | None:
    """The trainer's constant names, to check the launch script against (None if it is not there)."""
    return {s.name for s in declared_settings({"__file__": str(trainer)})} if trainer.is_file() else None


def plan_model(cfg, row: dict, target: planning.Target, overview: dict | None, dataset: str, n_train: int,
               n_val: int, known_flags: set | None, out: Path) -> dict:
    """Size, lengths, method and micro-batch, memory table, time, and (when it fits) train_<model>.sh."""
    shape, shape_source = planning.shape_for(row)
    hyper = planning.lora_hyperparameters(shape)
    lengths = planning.plan_lengths(overview, shape, cfg.MAX_INPUT_LENGTH, cfg.MAX_TARGET_LENGTH,
                                    cfg.MAX_INPUT_CAP, cfg.MAX_TARGET_CAP)
    args = (lengths["max_input_length"], lengths["max_target_length"], hyper["r"], hyper["target_modules"])
    choice = planning.choose_method(shape, target, cfg.MICRO_BATCH, *args, cfg.MEMORY_MARGIN)
    batch, checkpointing = choice["micro_batch"], choice["gradient_checkpointing"]
    memory = {m: planning.estimate_memory(shape, m, batch, *args, target.device, checkpointing)
              for m in ("full", "lora", "qlora")}
    plan = {"model": row["model"], "source": row.get("source") or row["model"], "parameters": shape.parameters,
            "size_from": shape_source, "family": shape.family,
            "model_type": shape.model_type, "target": target.name, "memory_gb": round(target.memory_gb, 1),
            "budget_gb": choice["budget_gb"], "method": choice["method"], "fits": choice["fits"],
            "micro_batch": batch, "gradient_checkpointing": checkpointing,
            "grad_accum": max(1, math.ceil(cfg.EFFECTIVE_BATCH / batch)), "memory": memory, "search": choice["tried"],
            "lengths": lengths, "lora": {k: hyper[k] for k in ("r", "alpha", "dropout", "target_modules")},
            "learning_rate": hyper["lr"], "epochs": cfg.EPOCHS, "train_samples": n_train,
            "val_samples": n_val, "benchmark": {k: row.get(k) for k in ("rougeL", "samples_per_s", "composite", "device")}}
    if not choice["fits"]:
        bigger = [k for k, spec in planning.GPUS.items()
                  if planning.choose_method(shape, planning.Target(k, k, spec.memory_gb, "table", "cuda"),
                                            cfg.MICRO_BATCH, *args, cfg.MEMORY_MARGIN)["fits"]]
        plan["time"] = {"available": False, "why": "nothing fits"}
        plan["needs"] = f"no method fits in {choice['budget_gb']} GB even at micro-batch 1; fits on: {', '.join(bigger) or 'none of the listed GPUs'}"
        return plan
    plan["time"] = planning.estimate_time(planning.number(row, "samples_per_s"), row.get("device"), target,
                                          plan["method"], n_train, n_val, cfg.EPOCHS, checkpointing)
    slug = re.sub(r"[^\w.-]+", "_", row["model"].lower()).strip("_") or "model"
    flags = {"MODEL": plan["source"], "DATASET": dataset, "TRAIN_SAMPLES": n_train, "VAL_SAMPLES": n_val,
             "EPOCHS": cfg.EPOCHS, "BATCH_SIZE": batch, "GRAD_ACCUM": plan["grad_accum"], "LEARNING_RATE": hyper["lr"],
             "MAX_INPUT_LENGTH": lengths["max_input_length"], "MAX_TARGET_LENGTH": lengths["max_target_length"],
             "LORA_R": hyper["r"], "LORA_ALPHA": hyper["alpha"], "LORA_DROPOUT": hyper["dropout"],
             "TARGET_MODULES": ",".join(hyper["target_modules"]), "LOAD_IN_4BIT": plan["method"] == "qlora",
             "GRADIENT_CHECKPOINTING": checkpointing}
    if shape.family == "causal":   # greedy, as the benchmark generated; 4 beams would quadruple eval time
        flags["NUM_BEAMS"] = 1
    flags["OUTPUT_DIR"] = f"ft_outputs/{slug}_{plan['method']}"
    plan["dropped_flags"] = sorted(set(flags) - known_flags) if known_flags is not None else []
    flags = {k: v for k, v in flags.items() if known_flags is None or k in known_flags}
    script = out / f"train_{slug}.sh"
    atomic_write_text(script, planning.launch_script(flags, plan, script, REPO / cfg.TRAINER))
    script.chmod(0o755)
    plan.update(flags=flags, script=str(script), adapter_dir=flags.get("OUTPUT_DIR"))
    return plan


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    ranking_path = require(cfg.RANKING, produced_by="benchmark_models.py", what="ranking")
    candidates = read_candidates(ranking_path, cfg.TOP_K)
    target = planning.resolve_target(cfg.GPU_NAME, cfg.GPU_MEMORY_GB)
    overview_path = resolve(cfg.OVERVIEW) if cfg.OVERVIEW else None
    overview = json.loads(overview_path.read_text(encoding="utf-8")) if overview_path and overview_path.is_file() else None
    bench = read_record(ranking_path.parent)
    dataset = cfg.DATASET or (overview or {}).get("dataset") or (bench.extra.get("dataset") if bench else None) or "knkarthick/highlightsum"
    n_train, n_val = cfg.TRAIN_SAMPLES, cfg.VAL_SAMPLES
    if overview and overview.get("dataset") == dataset:   # a small dataset has fewer rows than asked for
        rows = overview.get("rows", {})
        n_train = min(n_train, rows["train"]) if n_train and rows.get("train") else rows.get("train") or n_train
        n_val = min(n_val, rows["validation"]) if n_val and rows.get("validation") else rows.get("validation") or n_val
    out = output_dir(cfg.OUTPUT_DIR)
    known = trainer_flags(REPO / cfg.TRAINER)
    print(f"planning for {target.name} ({target.memory_gb:.1f} GB, {target.source}); budget "
          f"{cfg.MEMORY_MARGIN:.0%} = {cfg.MEMORY_MARGIN * target.memory_gb:.1f} GB; data {dataset} ({n_train} training / {n_val} validation rows)")
    plans = []
    for row in candidates:
        plan = plan_model(cfg, row, target, overview, dataset, n_train, n_val, known, out)
        plans.append(plan)
        if plan["fits"]:
            timing = plan["time"]
            print(f"  {plan['model']}: {plan['parameters'] / 1e6:,.1f}M parameters -> {planning.METHOD_NAMES[plan['method']]}"
                  f"{' + checkpointing' if plan['gradient_checkpointing'] else ''}, micro-batch {plan['micro_batch']} x "
                  f"{plan['grad_accum']}, ~{plan['memory'][plan['method']]['total']} GB; "
                  + (f"~{timing['minutes_per_epoch']} min/epoch (estimate)" if timing["available"] else "no time estimate")
                  + f"; {Path(plan['script']).name}")
        else:
            print(f"  {plan['model']}: {plan['needs']}")
    written = {Path(p["script"]).name for p in plans if p.get("script")}
    for old in out.glob("train_*.sh"):   # scripts of an earlier plan would look like this plan's
        if old.name not in written:
            old.unlink()
    meta = {"ranking": str(ranking_path), "dataset": dataset, "margin": cfg.MEMORY_MARGIN, "output_dir": str(out)}
    result = {"target": planning.as_dict(target), "memory_margin": cfg.MEMORY_MARGIN, "dataset": dataset,
              "ranking": str(ranking_path), "overview": str(overview_path) if overview else None,
              "time_label": "estimates, scaled from measured generation speed (expect within ~2x)",
              "recommendations": plans}
    atomic_write_json(out / "recommendations.json", result)
    atomic_write_text(out / "finetune_plan.md", planning.plan_markdown(plans, target, meta))
    write_record(out, RunRecord("recommend_finetune"), cfg, [ranking_path] + ([overview_path] if overview else []),
                 name="recommend_finetune.run_config.json")
    print(f"wrote {out / 'recommendations.json'}, finetune_plan.md and "
          f"{sum(p['fits'] for p in plans)} launch script(s) in {out}")
    return result


if __name__ == "__main__":
    run_cli(main)
