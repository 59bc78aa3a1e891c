"""Merging a LoRA adapter into its base, and the proof that the merge changed nothing.

The base is loaded in full precision (never 4-bit) with the adapter applied; on probe dialogues
the adapter model gives the reference (teacher-forced logits on the summary tokens and greedy
summaries, ship/parity.py), and the base alone gives the adapter's own effect: an adapter that
does not move the base's logits (untrained, or its weights did not fit this base) is refused,
so parity cannot pass on a no-op. The merged weights are saved to a temporary folder, reloaded
from disk and compared; only a passing merge replaces OUTPUT_DIR (contract/safety.py).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_write_json, atomic_write_text
from finetuneflow.contract.paths import require, resolve
from finetuneflow.contract.record import RunRecord, Split, portable, read_record, sha256_file, write_record
from finetuneflow.contract.safety import check_output_dir, replace_dir
from finetuneflow.contract.settings import FromConfig
from finetuneflow.model.loading import ADAPTER_CONFIG, adapter_base, load_config, load_model
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
from finetuneflow.ship.model_card import evaluations, model_card
from finetuneflow.ship.source import check_safetensors, check_weights, has_model_weights, read_config_json

if TYPE_CHECKING:   # torch and the parity toolkit load only once the checks have passed
    import torch

    from finetuneflow.ship import parity

STAGE = "merge_bart_lora"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TARGET_TOKENS = 64       # reference summary tokens scored per probe


@dataclass(frozen=True)
class MergeSettings(FromConfig):
    adapter: str
    output_dir: str
    base_model: str | None = None
    overwrite: bool = False
    dtype: str = "auto"
    device: str | None = None
    parity_dataset: str | None = None
    parity_samples: int = 4
    parity_new_tokens: int = 32
    max_logit_diff: float | None = None
    metrics_dir: str = "metrics"
    trust_remote_code: bool = False
    allow_unsafe_weights: bool = False


@dataclass
class MergeJob:
    """What a merge reads and writes, checked before anything slow runs."""
    adapter: Path
    upstream: RunRecord       # the adapter's run record
    base: str
    adapter_sha256: str
    out: Path
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def check_adapter(folder: Path, allow_unsafe: bool) -> tuple[RunRecord, Path]:
    """The adapter's run record and weights file; one clear line for a merged or unrelated folder."""
    if not (folder / ADAPTER_CONFIG).is_file():
        upstream = read_record(folder)
        if (upstream and upstream.lineage.merged_from) or has_model_weights(folder):
            raise UserError(f"{folder} is already a full (merged) model, not a LoRA adapter; merge takes the "
                            f"adapter folder written by train_bart_lora.py (e.g. --ADAPTER=ft_outputs/"
                            f"bart_lora_highlightsum); use this folder directly with inference_bart_lora.py")
        raise UserError(f"{folder} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); it is written by "
                        f"`python train_bart_lora.py`")
    weights = next((folder / f for f in ADAPTER_WEIGHTS if (folder / f).is_file()), None)
    if weights is None:
        raise UserError(f"{folder} has no adapter weights (adapter_model.safetensors); re-run train_bart_lora.py")
    if weights.suffix == ".bin" and not allow_unsafe:
        raise UserError(f"{weights} is a pickle, which can run code when loaded; re-save the adapter with "
                        f"safetensors, or pass --ALLOW_UNSAFE_WEIGHTS=True if you trust it")
    if weights.suffix == ".safetensors":
        check_safetensors(weights, fix="re-run train_bart_lora.py or restore the adapter")
    read_config_json(folder / ADAPTER_CONFIG, "adapter config", "re-run train_bart_lora.py or restore the adapter",
                     key=None)
    return read_record(folder) or RunRecord("unknown"), weights


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch
    from finetuneflow.model.device import default_dtype
    if name == "auto":
        return default_dtype(device)
    if name != "float32" and device.type == "cpu":
        raise UserError(f"--DTYPE={name} on CPU: merge in float32 on CPU (half precision is for GPUs)")
    return getattr(torch, name)


def check_base(base: str, adapter: Path, settings: MergeSettings) -> None:
    """The base exists, its files read (a local folder: config.json, weights), and it is not
    already quantized (that cannot take a full-precision merge)."""
    from finetuneflow.contract.paths import is_hub_id
    path = resolve(base)
    if not path.exists() and not is_hub_id(base):
        raise UserError(f"base model {base} of adapter {adapter} not found; restore it, or pass "
                        f"--BASE_MODEL=<its id or folder>")
    if path.is_dir():
        read_config_json(path / "config.json", "model config", "restore the base model's folder")
        check_weights(path, allow_pickled=settings.allow_unsafe_weights)
    config = load_config(base, settings.trust_remote_code)
    method = (getattr(config, "quantization_config", None) or {})
    if method:
        name = method.get("quant_method", "?") if isinstance(method, dict) else getattr(method, "quant_method", "?")
        raise UserError(f"base model {base} holds already-quantized weights ({name}); merge needs the full-precision "
                        f"base: pass it with --BASE_MODEL")


def plan(settings: MergeSettings) -> MergeJob | None:
    """The merge job, or None when OUTPUT_DIR already holds this adapter merged (and no OVERWRITE)."""
    adapter = require(settings.adapter, produced_by="train_bart_lora.py", what="adapter folder")
    upstream, weights = check_adapter(adapter, settings.allow_unsafe_weights)
    adapter_sha = sha256_file(weights)
    base = settings.base_model or adapter_base(adapter, upstream)
    out = resolve(settings.output_dir)
    existing = read_record(out) if out.is_dir() else None
    if not settings.overwrite and existing and existing.stage == STAGE and has_model_weights(out) \
            and existing.lineage.adapter_sha256 == adapter_sha:
        print(f"skip: {out} already holds this adapter merged ({existing.created}); pass --OVERWRITE=True to merge "
              f"again")
        return None
    out = check_output_dir(out, stage=STAGE, inputs=[adapter, base], overwrite=settings.overwrite)
    check_base(base, adapter, settings)
    from finetuneflow.model.device import parse_device   # torch: only once the checks have passed
    device = parse_device(settings.device)
    return MergeJob(adapter, upstream, base, adapter_sha, out, device, pick_dtype(settings.dtype, device))


def probe_source(settings: MergeSettings, upstream: RunRecord) -> tuple[str | None, Split | None]:
    """(dataset, how to read it): PARITY_DATASET, else the adapter's training data when it is a local
    file, else the samples. The training data (named by PARITY_DATASET or not) is read with the
    columns, fractions and seed its record names: a CSV with the user's own column names works."""
    split = upstream.split
    source = split.source if split else None
    recorded = source if source and resolve(source).exists() else None
    if settings.parity_dataset:
        same = recorded is not None and resolve(settings.parity_dataset).resolve() == resolve(recorded).resolve()
        return settings.parity_dataset, split if same else None
    return recorded, split if recorded else None


def merged_record(job: MergeJob) -> RunRecord:
    record = RunRecord(STAGE, **job.upstream.carried(), dtype=job.dtype_name, backend="transformers",
                       extra={"lora": job.upstream.extra.get("lora"), "device": str(job.device)})
    record.lineage.base_model, record.lineage.merged_from = portable(job.base), portable(job.adapter)
    record.lineage.adapter, record.lineage.adapter_sha256 = portable(job.adapter), job.adapter_sha256
    return record


def reference(loaded, items: list[dict], probes: list[dict], instruction: str, limit: int,
              new_tokens: int) -> dict:
    """The adapter model's logits and greedy summaries, and how far it moves its base's logits."""
    from finetuneflow.ship import parity
    adapter_logits = parity.logits(loaded, items)
    with loaded.model.disable_adapter():
        base_logits = parity.logits(loaded, items)
    effect = parity.compare(adapter_logits, base_logits)["max_abs"] or 0.0
    greedy = parity.summaries(loaded, probes, parity.greedy_settings(new_tokens), instruction, limit).summaries
    return {"logits": adapter_logits, "summaries": greedy, "adapter_effect": effect}


def merge_weights(loaded):
    """peft's merge (safe_merge checks for NaNs); LoRA weights left behind mean peft could not merge."""
    merged = loaded.model.merge_and_unload(safe_merge=True)
    leftovers = [name for name in merged.state_dict() if "lora_" in name]
    if leftovers:
        raise UserError(f"merge left LoRA weights in the model ({leftovers[0]}, ...); peft could not merge "
                        f"this adapter type")
    return merged


def verify(job: MergeJob, folder: Path, expected: dict, probes: list[dict], instruction: str, limit: int,
           settings: MergeSettings) -> parity.ParityReport:
    """Reload the saved merged folder and judge it against the adapter model's outputs."""
    from finetuneflow.ship import parity
    merged = load_model(str(folder), device=job.device, dtype=job.dtype, trust_remote_code=settings.trust_remote_code)
    items = parity.teacher_forced(merged, probes, instruction, limit, TARGET_TOKENS)
    measured = parity.compare(expected["logits"], parity.logits(merged, items))
    greedy = parity.summaries(merged, probes, parity.greedy_settings(settings.parity_new_tokens), instruction,
                              limit).summaries
    rows, agreement = parity.side_by_side(probes, expected["summaries"], greedy, ("adapter", "merged"))
    return parity.report("merge", job.dtype_name, measured, probes, rows, agreement,
                         overrides={"max_abs": settings.max_logit_diff})


def qlora_note(job: MergeJob) -> str:
    return (f"note: this adapter was trained with QLoRA on a 4-bit quantized {job.base}. It is merged into the "
            f"full-precision {job.base} ({job.dtype_name}): the LoRA update was learned against the quantized "
            f"weights, so the merged model is close to, not bit-identical with, the QLoRA model that was evaluated. "
            f"Parity below is against base+adapter in {job.dtype_name}; re-evaluate the merged folder with "
            f"eval_bart_lora.py.")


def refuse_no_op(effect: float, job: MergeJob) -> None:
    if effect == 0.0:
        raise UserError(f"adapter {job.adapter} does not change {job.base}'s outputs at all (max logit change 0): it "
                        f"is untrained, or its weights did not fit this base; pass the base it was trained on with "
                        f"--BASE_MODEL. Nothing was written")


def merge(settings: MergeSettings, provenance: dict | None = None, log=print) -> dict:
    """Merge, prove parity and write OUTPUT_DIR (model, tokenizer, README.md, merge_report.json,
    run_config.json); `provenance` (the stage's resolved settings) goes into the run record."""
    job = plan(settings)
    if job is None:
        return {"skipped": True, "output_dir": str(resolve(settings.output_dir))}
    import torch
    from finetuneflow.ship import parity
    if job.upstream.load_in_4bit:
        log(qlora_note(job))
    log(f"merging {job.adapter} into {job.base} ({job.dtype_name} on {job.device})")
    loaded = load_model(job.base, adapter=str(job.adapter), device=job.device, dtype=job.dtype,
                        trust_remote_code=settings.trust_remote_code,
                        allow_unsafe_weights=settings.allow_unsafe_weights)
    instruction = job.upstream.instruction or DEFAULT_INSTRUCTION
    limit = int(job.upstream.max_input_length or 512)
    dataset, recorded = probe_source(settings, job.upstream)
    probes, source = parity.load_probes(dataset, settings.parity_samples, recorded=recorded)
    items = parity.teacher_forced(loaded, probes, instruction, limit, TARGET_TOKENS)
    expected = reference(loaded, items, probes, instruction, limit, settings.parity_new_tokens)
    refuse_no_op(expected["adapter_effect"], job)
    merged, tokenizer, record = merge_weights(loaded), loaded.tokenizer, merged_record(job)
    with replace_dir(job.out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged, loaded
        gc.collect()
        report = verify(job, tmp, expected, probes, instruction, limit, settings)
        log(f"parity on {len(probes)} dialogues from {source}: {report.line()}; adapter effect on logits "
            f"{expected['adapter_effect']:.3g}")
        if not report.passed:
            hint = "; merge in float32 (--DTYPE=float32) to rule out rounding" if job.dtype != torch.float32 else ""
            raise UserError(f"merge parity failed ({'; '.join(report.failures)}){hint}; nothing was written")
        written = write_outputs(tmp, job, record, report, expected["adapter_effect"], source, settings, provenance)
    log(f"wrote {job.out} (model card README.md, merge_report.json); next: python post_merge_cleanup.py "
        f"--model={settings.output_dir}")
    return {"skipped": False, "output_dir": str(job.out), "report": written}


def write_outputs(tmp: Path, job: MergeJob, record: RunRecord, report: parity.ParityReport, effect: float,
                  source: str, settings: MergeSettings, provenance: dict | None) -> dict:
    data = {**report.to_dict(), "adapter_effect_max_abs": effect, "probe_source": portable(source),
            "dtype": job.dtype_name, "adapter": portable(job.adapter), "base": portable(job.base)}
    atomic_write_json(tmp / "merge_report.json", data)
    metrics_dir = resolve(settings.metrics_dir)
    found, skipped = evaluations(metrics_dir, job.adapter, job.base)
    atomic_write_text(tmp / "README.md", model_card(record, job.out.name, data, effect, found, skipped, metrics_dir))
    write_record(tmp, record, provenance if provenance is not None else vars(settings), [job.adapter])
    return data


