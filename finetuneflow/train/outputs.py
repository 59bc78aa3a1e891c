"""What a finished run leaves in OUTPUT_DIR: the adapter (best validation ROUGE-L), the tokenizer,
train_metrics.json (loss curve, every evaluation, best step, throughput, memory), loss_curve.png
and run_config.json, written last, which marks the run finished.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from finetuneflow.contract.io import atomic_path, atomic_write_json
from finetuneflow.contract.record import RunRecord, write_record
from finetuneflow.quality.metrics import ROUGE_KEYS
from finetuneflow.train import selection
from finetuneflow.train.evaluation import RATE_KEY
from finetuneflow.train.run_dir import STAGING_PREFIX, RunPlan, remove_checkpoints
from finetuneflow.train.trainer import SummarizationTrainer, peak_rss_mb

# per evaluation: the cost of each part (seconds) and what was generated
EVAL_COST_KEYS = ("generation_seconds", "loss_seconds", "scoring_seconds", "generated_rows", "generated_tokens",
                  "budget_stopped", "faithfulness_readable")
# dpo/orpo: TRL's validation-pair metrics (share of pairs whose chosen summary is preferred, and by how much)
PREFERENCE_KEYS = {"rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin"}


def evaluation_rows(history: list[dict]) -> list[dict]:
    """One row per evaluated step: loss, ROUGE, unsupported-mention rate and what it cost."""
    by_step = {}
    for h in history:
        if "eval_loss" in h:
            row = {"step": h["step"], "epoch": round(h.get("epoch") or 0, 4), "eval_loss": round(h["eval_loss"], 5),
                   **{k: h.get(f"eval_{k}") for k in ROUGE_KEYS}, RATE_KEY: h.get(f"eval_{RATE_KEY}")}
            row.update({k: h.get(f"eval_{k}") for k in EVAL_COST_KEYS})
            row.update({name: round(h[f"eval_{key}"], 5) for key, name in PREFERENCE_KEYS.items()
                        if f"eval_{key}" in h})
            if row["budget_stopped"] is not None:
                row["budget_stopped"] = bool(row["budget_stopped"])
            by_step[h["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def evaluation_summary(trainer: SummarizationTrainer) -> tuple[dict, dict]:
    """What the evaluations generated and cost, and how the best checkpoint was chosen."""
    spec = trainer.generation_eval
    choice = selection.select(selection.evaluations(trainer.state.log_history), trainer.select_on,
                              trainer.faithfulness_margin)
    evaluation = {"subset_rows": len(spec.dialogues) if spec else None, "rows_generated": trainer.fixed_rows(),
                  "budget_seconds": spec.budget_seconds if spec else None,
                  "generation": spec.settings.as_dict() if spec else None,
                  "faithfulness_check": spec.rate_note if spec else None}
    chosen = {"select_on": trainer.select_on, "faithfulness_margin": trainer.faithfulness_margin,
              "best_step": choice.best_step, "threshold": choice.threshold, "eligible_steps": choice.eligible,
              "note": choice.note, "rule": selection.RULE_TEXT[trainer.select_on]}
    return evaluation, chosen


def train_metrics(trainer: SummarizationTrainer, extra: dict) -> dict:
    """Loss curve, every evaluation (with its cost), the best step, throughput and peak memory."""
    history = trainer.state.log_history
    curve = [{"step": h["step"], "epoch": round(h.get("epoch") or 0, 4), "loss": round(h["loss"], 5),
              "learning_rate": h.get("learning_rate"), "grad_norm": h.get("grad_norm")}
             for h in history if "loss" in h]
    evals = evaluation_rows(history)
    zero_shot = next((e for e in evals if e["step"] == 0), None)
    evaluation, chosen = evaluation_summary(trainer)
    state = trainer.state
    speed = trainer.throughput()
    steps_run = state.global_step - trainer.session["start_step"]
    speed["seconds_per_step"] = round(speed["train_seconds"] / steps_run, 3) if steps_run else None
    memory = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        memory["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"global_step": state.global_step, "epochs": round(state.epoch or 0, 4),
            "resumed_from_step": trainer.session["start_step"] or None,
            "best_step": state.best_global_step, "best_rougeL": state.best_metric,
            "zero_shot_rougeL": zero_shot["rougeL"] if zero_shot else None,
            "final_train_loss": curve[-1]["loss"] if curve else None, "evaluation": evaluation, "selection": chosen,
            "loss_curve": curve, "evals": evals, "throughput": speed, "memory": memory, **extra}


def plot_loss_curve(metrics: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    curve, evals = metrics["loss_curve"], metrics["evals"]
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label="train loss", color="#4C72B0")
    ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="validation loss", color="#DD8452")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    rouge = ax.twinx()
    rouge.plot([e["step"] for e in evals], [e["rougeL"] for e in evals], "s--", label="validation ROUGE-L",
               color="#55A868")
    rouge.set_ylabel("ROUGE-L (generated)")
    if metrics.get("best_step") is not None:
        ax.axvline(metrics["best_step"], color="grey", linestyle=":", label=f"best step {metrics['best_step']}")
    lines = ax.get_legend_handles_labels()[0] + rouge.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    ax.set_title("training loss and validation ROUGE-L")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_outputs(plan: RunPlan, model, tokenizer, metrics: dict, config: Mapping, input_files: Iterable,
                 record: RunRecord, keep_checkpoints: bool) -> list[str]:
    """Write the adapter folder: every file is staged, then moved in; run_config.json comes last
    and marks the run finished. Returns the file names."""
    out = plan.out
    staging = Path(tempfile.mkdtemp(dir=out, prefix=STAGING_PREFIX))
    try:
        model.save_pretrained(staging, safe_serialization=True, selected_adapters=["default"])   # not DPO's "ref"
        (staging / "README.md").unlink(missing_ok=True)   # PEFT's model-card stub is not part of the contract
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "train_metrics.json", metrics)
        plot_loss_curve(metrics, staging / "loss_curve.png")
        files = sorted(p.name for p in staging.iterdir() if p.is_file()) + ["run_config.json"]
        for name in files[:-1]:
            os.replace(staging / name, out / name)
        record.extra["files"] = sorted(files)
        write_record(out, record, config, input_files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_checkpoints:
        remove_checkpoints(plan.checkpoints)
    return sorted(files)
