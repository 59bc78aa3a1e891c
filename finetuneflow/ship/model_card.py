"""The merged model's card (README.md): base, data, LoRA settings, prompt, parity, metrics, use, limits.

Metrics come through the evaluation stage's run records, never by guessing from file contents:
every `<tag>_run_config.json` in METRICS_DIR whose stage is "eval" (and that finished) points at
its `<tag>_eval.json`, whose `averages` and `model` fields say what was scored and on which
model. Only evaluations of this adapter, of a model merged from it, or of its base model
(zero-shot) are quoted; the others are counted, and named as skipped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord, read_record
from finetuneflow.model.family import SEQ2SEQ

RECORD_SUFFIX = "_run_config.json"
SCORES = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("rougeLsum", "ROUGE-Lsum"))


@dataclass
class Evaluation:
    tag: str
    about: str          # "this adapter" | "a model merged from this adapter" | "the base model (zero-shot)"
    averages: dict
    samples: int | None
    dataset: str

    def line(self) -> str:
        scores = ", ".join(f"{label} {self.averages[key]:.2f}" for key, label in SCORES if key in self.averages)
        return f"- {self.about} (`{self.tag}`): {scores} on {self.samples} rows of {self.dataset}"


def _same(a, b) -> bool:
    if not a or not b:
        return False
    pa, pb = resolve(str(a)), resolve(str(b))
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return str(a) == str(b)


def _about(model: dict, adapter: Path, base: str) -> str | None:
    lineage = model.get("lineage") or {}
    if _same(model.get("adapter"), adapter) or _same(model.get("name"), adapter):
        return "this adapter"
    if _same(lineage.get("merged_from"), adapter) or _same(lineage.get("adapter"), adapter):
        return "a model merged from this adapter"
    if not model.get("adapter") and (_same(model.get("name"), base) or _same(model.get("base"), base)):
        return "the base model (zero-shot)"
    return None


def _evaluation(metrics_dir: Path, record_name: str, adapter: Path, base: str) -> Evaluation | None:
    """The evaluation a record names, when it concerns this adapter or its base."""
    try:
        record = read_record(metrics_dir, record_name)
    except UserError:
        return None
    if record is None or record.stage != "eval" or record.extra.get("status", "finished") != "finished":
        return None
    tag = str(record.extra.get("tag") or record_name.removesuffix(RECORD_SUFFIX))
    try:
        summary = json.loads((metrics_dir / f"{tag}_eval.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    about = _about(summary.get("model") or {}, adapter, base) if isinstance(summary, dict) else None
    if about is None or not isinstance(summary.get("averages"), dict):
        return None
    dataset = summary.get("dataset") or {}
    where = f"{dataset.get('split', '?')} split of {dataset.get('source', '?')}" if dataset else "?"
    return Evaluation(tag, about, summary["averages"], summary.get("samples"), where)


def evaluations(metrics_dir: Path, adapter: Path, base: str) -> tuple[list[Evaluation], int]:
    """(evaluations of this adapter or its base, how many other eval records were skipped)."""
    if not metrics_dir.is_dir():
        return [], 0
    found, skipped = [], 0
    for path in sorted(metrics_dir.glob(f"*{RECORD_SUFFIX}")):
        evaluation = _evaluation(metrics_dir, path.name, adapter, base)
        if evaluation is None:
            skipped += 1
        else:
            found.append(evaluation)
    return found, skipped


def _metrics_section(found: list[Evaluation], skipped: int, metrics_dir: Path) -> list[str]:
    lines = ["## Metrics"]
    if found:
        lines += ["Evaluations found in `{}` (eval_bart_lora.py records; ROUGE F1 x 100):".format(metrics_dir), ""]
        lines += [e.line() for e in found]
    else:
        lines.append(f"No evaluation of this adapter or its base was found in `{metrics_dir}`; run "
                     f"`python eval_bart_lora.py` on the merged folder.")
    if skipped:
        lines.append(f"({skipped} other record(s) there concern other models or unfinished runs and are not quoted.)")
    return lines


def model_card(record: RunRecord, out_name: str, parity: dict, adapter_effect: float, found: list[Evaluation],
               skipped: int, metrics_dir: Path) -> str:
    """README.md for the merged folder (front matter for the Hub, then plain sections)."""
    family, lineage = record.family, record.lineage
    lora = record.extra.get("lora") or {}
    generation = record.generation.overrides() if record.generation else {}
    measured = parity["measured"]
    lines = ["---", "library_name: transformers", f"base_model: {lineage.base_model}",
             f"pipeline_tag: {'summarization' if family == SEQ2SEQ else 'text-generation'}",
             "tags: [dialogue-summarization, lora, peft, finetuneflow]", "---", "",
             f"# {out_name}: dialogue summarizer (LoRA merged)", "",
             "## Model", f"- Base model: `{lineage.base_model}` ({family})",
             f"- Adapter merged: `{lineage.merged_from}`"
             + (" (trained with QLoRA on a 4-bit base; merged into the full-precision base)"
                if record.load_in_4bit else ""),
             f"- Weights: {record.dtype}, safetensors",
             f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
             f"targets={lora.get('target_modules')}", "",
             "## Training data", f"- {record.split.source if record.split and record.split.source else 'not recorded'}",
             "", "## How it is prompted",
             f"- Instruction: \"{record.instruction}\"" if family != SEQ2SEQ else
             "- Input: the dialogue text (turns separated by newlines)",
             f"- Max input length: {record.max_input_length} tokens",
             f"- Evaluated generation settings: {json.dumps(generation) if generation else 'the model defaults'}", "",
             "## Merge parity (adapter vs merged)",
             f"- {measured.get('summaries_identical')}/{measured.get('summaries_compared')} identical greedy "
             f"summaries; "
             f"max |logit difference| {measured['max_abs']:.2e} (threshold {parity['thresholds']['max_abs']:.0e}) over "
             f"{measured['positions']} summary tokens; the adapter itself moves logits by up to {adapter_effect:.3g}",
             ""]
    lines += _metrics_section(found, skipped, metrics_dir)
    lines += ["", "## Intended use",
              "Summarizing English dialogues (chats, meetings, customer calls) similar to the training data, "
              "with a human reviewing the output.", "",
              "## Limits",
              "- Summaries can omit facts, misattribute who said what, or state things not in the dialogue.",
              f"- Inputs longer than {record.max_input_length} tokens are truncated unless summarized in "
              "windows (`inference_bart_lora.py --LONG_INPUT=chunk`).",
              "- Quality was measured only on the data listed above; other domains and languages are untested.",
              "- Run `python post_merge_cleanup.py` before deploying: it makes the evaluated generation settings "
              "the defaults.", ""]
    return "\n".join(lines)
