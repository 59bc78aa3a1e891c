"""Stage 5 - merge the LoRA adapter into its base model, and prove the merge is lossless.

Reads:  ADAPTER (adapter folder from train_bart_lora.py: adapter weights, tokenizer, run_config.json)
        the base model named in the adapter's run_config.json (or BASE_MODEL)
        METRICS_DIR/summary_metrics.csv and *_eval.json (for the model card, when present)
Writes: OUTPUT_DIR/model.safetensors, config.json, generation_config.json, tokenizer files
        OUTPUT_DIR/README.md          model card: base, data, LoRA settings, metrics, use, limits
        OUTPUT_DIR/merge_report.json  parity: max |logit diff| adapter vs merged, identical greedy outputs
        OUTPUT_DIR/run_config.json    family, instruction, generation, max_input_length, merged_from

Run as:
    python merge_bart_lora.py
    python merge_bart_lora.py --adapter=ft_outputs/smollm2_lora --output_dir=ft_outputs/smollm2_merged
The base is loaded in full precision (never 4-bit); the merged folder is written only when parity
passes. Re-running skips an existing merged folder made from the same adapter (OVERWRITE=True redoes it).
"""
ADAPTER = "ft_outputs/bart_lora_highlightsum"   # adapter folder written by train_bart_lora.py
BASE_MODEL = None                      # [str | None] None: the base recorded in the adapter's run_config.json
OUTPUT_DIR = "ft_outputs/bart_merged_highlightsum"  # where the merged model goes
OVERWRITE = False                      # True: replace an existing merged folder
DTYPE = "auto"                         # [auto | float32 | float16 | bfloat16] auto (bf16/fp16 on GPU, fp32 on CPU), float32, float16, bfloat16
DEVICE = None                          # [str | None] None: cuda when available, else cpu
PARITY_DATASET = None                  # [str | None] local data file for parity probes; None: the adapter's data, else the samples
PARITY_SAMPLES = 4                     # [int >= 1] dialogues in the parity check
PARITY_NEW_TOKENS = 32                 # [int >= 1] greedy tokens generated per probe and compared
MAX_LOGIT_DIFF = None                  # [float > 0 | None] parity tolerance; None: 1e-3 fp32, 5e-2 fp16, 0.25 bf16
METRICS_DIR = "metrics"                # evaluation results quoted in the model card
TRUST_REMOTE_CODE = False              # allow custom model code from the Hub

import gc

import torch

from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.contract.io import atomic_write_json, atomic_write_text
from finetuneflow.contract.paths import require, resolve
from finetuneflow.contract.record import RunRecord, portable, read_record, sha256_file, write_record
from finetuneflow.contract.safety import check_output_dir, replace_dir
from finetuneflow.contract.settings import configure
from finetuneflow.model.backends.hf import default_dtype, parse_device
from finetuneflow.model.loading import ADAPTER_CONFIG, adapter_base, load_model
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
from finetuneflow.ship.merging import (collect_metrics, compare, has_model_weights, model_card, probe_dialogues,
                                       reference_outputs, tolerance_for)

STAGE = "merge_bart_lora"


def check_adapter(folder) -> RunRecord:
    """The adapter's run record; a clear error for a merged or unrelated folder."""
    if not (folder / ADAPTER_CONFIG).is_file():
        upstream = read_record(folder)
        if (upstream and upstream.lineage.merged_from) or has_model_weights(folder):
            raise UserError(f"{folder} is already a full (merged) model, not a LoRA adapter; merge takes the "
                            f"adapter folder written by train_bart_lora.py (e.g. --ADAPTER=ft_outputs/"
                            f"bart_lora_highlightsum); use this folder directly with inference_bart_lora.py")
        raise UserError(f"{folder} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); it is written by "
                        f"`python train_bart_lora.py`")
    return read_record(folder) or RunRecord("unknown")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return default_dtype(device)
    if name != "float32" and device.type == "cpu":
        raise UserError(f"--DTYPE={name} on CPU: merge in float32 on CPU (half precision is for GPUs)")
    return getattr(torch, name)


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    adapter = require(cfg.ADAPTER, produced_by="train_bart_lora.py", what="adapter folder")
    upstream = check_adapter(adapter)
    out = resolve(cfg.OUTPUT_DIR)
    weights = next((adapter / f for f in ("adapter_model.safetensors", "adapter_model.bin")
                    if (adapter / f).is_file()), None)
    if weights is None:
        raise UserError(f"{adapter} has no adapter weights (adapter_model.safetensors); re-run train_bart_lora.py")
    adapter_sha = sha256_file(weights)
    base = cfg.BASE_MODEL or adapter_base(adapter, upstream)
    existing = read_record(out) if out.is_dir() else None
    if not cfg.OVERWRITE and existing and existing.stage == STAGE and has_model_weights(out) \
            and existing.lineage.adapter_sha256 == adapter_sha:
        print(f"skip: {out} already holds this adapter merged ({existing.created}); pass --OVERWRITE=True to merge "
              f"again")
        return {"skipped": True, "output_dir": str(out)}
    out = check_output_dir(out, stage=STAGE, inputs=[adapter, base], overwrite=cfg.OVERWRITE)
    device = parse_device(cfg.DEVICE)
    dtype = pick_dtype(cfg.DTYPE, device)
    tolerance = tolerance_for(dtype, cfg.MAX_LOGIT_DIFF)
    if upstream.load_in_4bit:
        print(f"note: this adapter was trained with QLoRA on a 4-bit quantized {base}. It is merged into the "
              f"full-precision {base} ({str(dtype).removeprefix('torch.')}): the LoRA update was learned against "
              f"the quantized weights, so the merged model is close to, not bit-identical with, the QLoRA model "
              f"that was evaluated. Parity below is against base+adapter in {str(dtype).removeprefix('torch.')}; "
              f"re-evaluate the merged folder with eval_bart_lora.py.")
    print(f"merging {adapter} into {base} ({str(dtype).removeprefix('torch.')} on {device})")
    loaded = load_model(base, adapter=str(adapter), device=device, dtype=dtype,
                        trust_remote_code=cfg.TRUST_REMOTE_CODE)
    instruction = upstream.instruction or DEFAULT_INSTRUCTION
    limit = int(upstream.max_input_length or 512)
    rows, probe_source = probe_dialogues(cfg.PARITY_DATASET or (upstream.split.source if upstream.split else None),
                                         cfg.PARITY_SAMPLES)
    reference = reference_outputs(loaded, rows, instruction, limit, cfg.PARITY_NEW_TOKENS)
    merged = loaded.model.merge_and_unload(safe_merge=True)
    leftovers = [name for name in merged.state_dict() if "lora_" in name]
    if leftovers:
        raise UserError(f"merge left LoRA weights in the model ({leftovers[0]}, ...); peft could not merge "
                        f"this adapter type")
    record = RunRecord(STAGE, **upstream.carried(), dtype=str(dtype).removeprefix("torch."), backend="transformers",
                       extra={"lora": upstream.extra.get("lora"), "device": str(device)})
    record.lineage.base_model, record.lineage.merged_from = portable(base), portable(adapter)
    record.lineage.adapter, record.lineage.adapter_sha256 = portable(adapter), adapter_sha
    card = {**record.to_dict(), "base_model": base, "merged_from": portable(adapter), "merged_into": str(out),
            "dataset": upstream.split.source if upstream.split else None}
    with replace_dir(out) as tmp:
        merged.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        del merged, loaded
        gc.collect()
        reloaded = load_model(str(tmp), device=device, dtype=dtype, trust_remote_code=cfg.TRUST_REMOTE_CODE)
        report = compare(reference, reloaded, rows, instruction, limit, cfg.PARITY_NEW_TOKENS, tolerance)
        report.update({"probe_source": portable(probe_source), "dtype": record.dtype, "adapter": portable(adapter),
                       "base": portable(base)})
        print(f"parity on {report['probes']} dialogues from {probe_source}: "
              f"{report['identical_greedy_outputs']}/{report['probes']} identical greedy outputs, "
              f"max |logit diff| {report['max_abs_logit_diff']:.3e} (tolerance {tolerance:.0e}); "
              f"adapter effect on logits {report['adapter_effect_max_abs_logit_diff']:.3g}")
        if report["adapter_effect_max_abs_logit_diff"] == 0.0:
            print("warning: the adapter does not change the base model's outputs (LoRA B weights are zero: "
                  "was it trained?)")
        if not report["passed"]:
            hint = "; merge in float32 (--DTYPE=float32) to rule out rounding" if dtype != torch.float32 else ""
            raise UserError(f"merge parity failed: {report['identical_greedy_outputs']}/{report['probes']} identical "
                            f"greedy outputs, max |logit diff| {report['max_abs_logit_diff']:.3e} > {tolerance:.0e}"
                            f"{hint}; nothing was written")
        metrics_dir = resolve(cfg.METRICS_DIR)
        atomic_write_json(tmp / "merge_report.json", report)
        atomic_write_text(tmp / "README.md", model_card(card, report, collect_metrics(metrics_dir), metrics_dir))
        write_record(tmp, record, cfg, [adapter])
    print(f"wrote {out} (model card README.md, merge_report.json); next: python post_merge_cleanup.py "
          f"--model={cfg.OUTPUT_DIR}")
    return {"skipped": False, "output_dir": str(out), "report": report}


if __name__ == "__main__":
    run_cli(main)
