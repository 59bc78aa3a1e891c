"""finetune_plan.md: the target and the rules, then per model its size, memory table, choice,
time estimate and the launch script. Names from the ranking are written as single lines."""
from __future__ import annotations

import re
from pathlib import Path

from finetuneflow.plan.hardware import Target, one_line
from finetuneflow.plan.memory import METHOD_NAMES


def _intro(target: Target, meta: dict) -> list[str]:
    return ["# Fine-tuning plan", "",
            f"Target: **{one_line(target.name)}**, {target.memory_gb:.1f} GB ({target.source}); a plan may fill "
            f"{meta['margin']:.0%} of it. Ranking: `{one_line(meta['ranking'])}`. Training data: "
            f"`{one_line(meta['dataset'])}`" + (", read with " + ", ".join(
                f"`{name}={one_line(str(value))}`" for name, value in meta.get("data_settings", {}).items())
                if meta.get("data_settings") else "") + ".", "",
            "Memory = weights + gradients + optimizer + activations + logits + overhead (formula in "
            "`finetuneflow/plan/memory.py`). The method is the cheapest that fits: LoRA, then LoRA with gradient "
            "checkpointing, then QLoRA (4-bit base), at the planned micro-batch, which is halved when nothing fits. "
            "Times are **estimates** scaled from the benchmark's measured generation speed (expect within ~2x).", ""]


def _size_lines(p: dict) -> list[str]:
    bench, lengths = p["benchmark"], p["lengths"]
    notes = "; " + "; ".join(lengths["notes"]) if lengths["notes"] else ""
    return [f"- Size: {p['parameters']:,} parameters ({p['parameters'] / 1e6:,.1f}M), {p['family']} "
            f"({one_line(p['model_type'])}); from the {one_line(p['size_from'])}.",
            f"- Benchmark: ROUGE-L {one_line(bench['rougeL'])}, {one_line(bench['samples_per_s'])} samples/s on "
            f"{one_line(bench['device'] or 'an unnamed device')}, composite {one_line(bench['composite'])}.",
            f"- Lengths: input {lengths['max_input_length']}, summary {lengths['max_target_length']} tokens "
            f"({lengths['source']}{notes}).", ""]


def _memory_table(p: dict) -> list[str]:
    lines = [f"| method | weights | grads | optimizer | activations | logits | total GB (micro-batch "
             f"{p['micro_batch']}) | fits in {p['budget_gb']} GB |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for method, m in p["memory"].items():
        fits = "yes" if m["total"] <= p["budget_gb"] else "no"
        lines.append(f"| {METHOD_NAMES[method]} | {m['weights']} | {m['gradients']} | {m['optimizer']} | "
                     f"{m['activations']} | {m['logits']} | {m['total']} | {fits} |")
    return lines + [""]


def _time_line(timing: dict) -> str:
    if not timing["available"]:
        return f"- Time: no estimate ({timing['why']})."
    return (f"- Time (estimate): ~{timing['minutes_per_epoch']} min per epoch ({timing['train_minutes_per_epoch']} "
            f"training + {timing['eval_minutes_per_epoch']} validation), ~{timing['total_minutes']} min in total "
            f"with the zero-shot evaluation before training; measured on {timing['measured_on']}, speed "
            f"x{timing['speed_scale']}.")


def _recommendation(p: dict, script_text: str, meta: dict) -> list[str]:
    tried = ", ".join(f"{METHOD_NAMES[t['method']]}{' + checkpointing' if t['gradient_checkpointing'] else ''}"
                      f" @ {t['micro_batch']}: {t['total_gb']} GB" for t in p["search"])
    rows = "all" if p["train_samples"] is None else p["train_samples"]
    lines = [f"**Recommendation: {METHOD_NAMES[p['method']]}**"
             f"{' with gradient checkpointing' if p['gradient_checkpointing'] else ''}, micro-batch "
             f"{p['micro_batch']} x gradient accumulation {p['grad_accum']}. Tried in order: {tried}. "
             f"(Full fine-tuning is shown for reference; the trainer trains adapters.)", "",
             f"- Hyperparameters: {p['epochs']:g} epochs on {rows} rows, lr {p['learning_rate']:g}, "
             f"LoRA r={p['lora']['r']}, alpha={p['lora']['alpha']}, dropout {p['lora']['dropout']}, "
             f"targets {', '.join(p['lora']['target_modules'])}.",
             _time_line(p["time"]),
             f"- Run: `bash {Path(p['script']).name}` (in `{one_line(meta['output_dir'])}`); the adapter goes to "
             f"`{p['adapter_dir']}`."]
    if p["dropped_flags"]:
        lines.append(f"- Not passed (the trainer has no such setting): {', '.join(p['dropped_flags'])}.")
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", script_text)), default=0))
    return lines + ["", fence + "bash", script_text.strip(), fence, ""]


def plan_markdown(plans: list[dict], scripts: dict[str, str], target: Target, meta: dict) -> str:
    lines = _intro(target, meta)
    for i, p in enumerate(plans, 1):
        lines += [f"## {i}. {one_line(p['model'])}", ""]
        if "error" in p:
            lines += [f"**Not planned**: {one_line(p['error'])}", ""]
            continue
        lines += _size_lines(p) + _memory_table(p)
        if not p["fits"]:
            lines += [f"**Does not fit**: {p['needs']}.", ""]
            continue
        lines += _recommendation(p, scripts[Path(p["script"]).name], meta)
    return "\n".join(lines) + "\n"
