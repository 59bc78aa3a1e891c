"""Stage 6 - give the merged model one consistent generation config: the evaluated settings as defaults.

Reads:  MODEL (the merged folder from merge_bart_lora.py: weights, config.json, generation_config.json,
        tokenizer, run_config.json with the evaluated "generation" settings)
Writes: OUTPUT_DIR/ the same weights and tokenizer (copied, unchanged) with
        config.json             generation parameters and stale task_specific_params removed
        generation_config.json  special tokens checked against the tokenizer, evaluated settings as defaults
        cleanup_report.json     every change with its reason, and the verification result
        README.md, run_config.json

Run as:
    python post_merge_cleanup.py
    python post_merge_cleanup.py --model=ft_outputs/smollm2_merged --output_dir=ft_outputs/smollm2_clean
Afterwards a plain `model.generate(**inputs)` reproduces the evaluated summaries: the script checks
that by loading the result with plain transformers, generating with no warnings allowed, and comparing
with the shared engine. Safe to re-run: the output folder is rebuilt atomically.
"""
MODEL = "ft_outputs/bart_merged_highlightsum"  # merged model folder from merge_bart_lora.py
OUTPUT_DIR = "ft_outputs/bart_merged_clean"  # where the cleaned model goes
OVERWRITE = False                      # True: replace an earlier cleaned folder in OUTPUT_DIR
NUM_BEAMS = None                       # [int >= 1 | None] None: the evaluated value from MODEL/run_config.json
MAX_NEW_TOKENS = None                  # [int >= 1 | None] None: evaluated value (tokens)
MIN_NEW_TOKENS = None                  # [int >= 0 | None] None: evaluated value (tokens)
NO_REPEAT_NGRAM_SIZE = None            # [int >= 0 | None] None: evaluated value
LENGTH_PENALTY = None                  # [float | None] None: evaluated value (beam search only)
VERIFY_SAMPLES = 2                     # [int >= 1] dialogues generated with plain generate() to verify the result
DEVICE = None                          # [str | None] None: cuda when available, else cpu

import json
import shutil

from transformers import AutoConfig, GenerationConfig

from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.contract.io import atomic_write_json, atomic_write_text
from finetuneflow.contract.paths import require
from finetuneflow.contract.record import RunRecord, portable, read_record, write_record
from finetuneflow.contract.safety import check_output_dir, replace_dir
from finetuneflow.contract.settings import configure
from finetuneflow.model.backends.hf import parse_device
from finetuneflow.model.family import family_of
from finetuneflow.model.loading import is_adapter_dir, load_tokenizer
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
from finetuneflow.ship.merging import clean_configs, has_model_weights, probe_dialogues, verify_clean

STAGE = "post_merge_cleanup"
RENAMED = {"MERGED_DIR": "MODEL"}
REWRITTEN = {"config.json", "generation_config.json", "run_config.json", "README.md", "cleanup_report.json"}


def main(argv=None) -> dict:
    cfg = configure(globals(), argv, renamed=RENAMED)
    source = require(cfg.MODEL, produced_by="merge_bart_lora.py", what="merged model folder")
    if is_adapter_dir(source):
        raise UserError(f"{source} is a LoRA adapter, not a merged model; run `python merge_bart_lora.py "
                        f"--adapter={cfg.MODEL}` first and clean its output")
    if not has_model_weights(source) or not (source / "config.json").is_file():
        raise UserError(f"{source} holds no model (config.json + safetensors); it is written by "
                        f"`python merge_bart_lora.py`")
    out = check_output_dir(cfg.OUTPUT_DIR, stage=STAGE, inputs=[source], overwrite=cfg.OVERWRITE)
    upstream = read_record(source) or RunRecord("unknown")
    if not upstream.generation:
        print(f"note: {source}/run_config.json records no evaluated generation settings; the model's own "
              f"generation config is kept except where set here")
    evaluated = upstream.generation.overrides() if upstream.generation else {}
    evaluated.update(GenerationSettings.from_config(cfg).overrides())
    raw_config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config = AutoConfig.from_pretrained(source)
    family = family_of(config)
    generation = (GenerationConfig.from_pretrained(source) if (source / "generation_config.json").is_file()
                  else GenerationConfig())
    tokenizer = load_tokenizer(str(source), family, config)
    changes = clean_configs(raw_config, config, generation, tokenizer, family, evaluated)
    instruction = upstream.instruction or DEFAULT_INSTRUCTION
    limit = int(upstream.max_input_length or tokenizer.model_max_length)
    rows, _ = probe_dialogues(None, cfg.VERIFY_SAMPLES)
    device = parse_device(cfg.DEVICE)
    with replace_dir(out) as tmp:
        for item in source.iterdir():
            if item.is_file() and item.name not in REWRITTEN:
                shutil.copy2(item, tmp / item.name)
        config.save_pretrained(tmp)
        try:
            generation.save_pretrained(tmp)   # validates strictly: an inconsistent config cannot be saved
        except ValueError as exc:
            raise UserError(f"the cleaned generation config is still invalid: {str(exc).splitlines()[0]}") from None
        verification = verify_clean(tmp, rows, instruction, limit, evaluated, device)
        report = {"source": portable(source), "family": family, "evaluated_generation": evaluated,
                  "changes": changes.items, "generation_config": generation.to_diff_dict(),
                  "verification": verification}
        print(f"{len(changes.items)} changes:")
        for change in changes.items:
            print(f"  {change['file']}: {change['key']} {change['before']!r} -> {change['after']!r} ({change['why']})")
        if not verification["passed"]:
            problems = verification["warnings"] or [verification["generation_config_invalid"] or
                                                    "plain generate() differs from the evaluated outputs"]
            raise UserError(f"verification failed ({len(problems)} problems; first: {problems[0][:200]}); "
                            f"nothing was written")
        atomic_write_json(tmp / "cleanup_report.json", report)
        card = (source / "README.md").read_text(encoding="utf-8") if (source / "README.md").is_file() else ""
        defaults = {k: v for k, v in generation.to_diff_dict().items() if k != "transformers_version"}
        atomic_write_text(tmp / "README.md", card.rstrip() + "\n\n## Generation defaults (post_merge_cleanup.py)\n"
                          "`generation_config.json` holds the evaluated settings, so a plain `generate()` "
                          "reproduces the evaluated summaries"
                          + (" (decoder-only with a no-repeat rule: pass finetuneflow.model.backends.hf.GeneratedNoRepeatNGram "
                             "as a logits processor, see cleanup_report.json)" if family != "seq2seq"
                             and evaluated.get("no_repeat_ngram_size") else "")
                          + f":\n\n```json\n{json.dumps(defaults, indent=2)}\n```\n")
        carried = upstream.carried()
        carried.update(family=family, instruction=instruction, max_input_length=limit,
                       generation=GenerationSettings(**evaluated))
        record = RunRecord(STAGE, **carried, dtype=upstream.dtype, backend="transformers",
                           extra={"lora": upstream.extra.get("lora")})
        record.lineage.cleaned_from = portable(source)
        write_record(tmp, record, cfg, [source])
    print(f"verified: loads and generates with no warnings; plain generate() matches the evaluated outputs "
          f"on {len(rows)} dialogues")
    print(f"wrote {out} (cleanup_report.json lists every change); next: python inference_bart_lora.py "
          f"--model={cfg.OUTPUT_DIR}")
    return report


if __name__ == "__main__":
    run_cli(main)
