"""Post-merge cleanup: one consistent generation config, the evaluated settings as its defaults.

`clean_configs` edits config.json / generation_config.json in small steps, each recording what it
changed and why (`Changes`, for cleanup_report.json):

1. generation parameters left in config.json move to the generation config;
2. task_specific_params keep only a task prefix (their decoding keys fight the evaluated settings);
3. special tokens are checked against the tokenizer;
4. the evaluated decoding settings (the record's "generation") become the defaults;
5. flags the chosen decoding ignores are dropped (sampling knobs, beam-only flags under greedy).

`verify_clean` then proves it (ship/parity.py): the cleaned folder computes the source's logits
(the weights are copied unchanged), and loading it with plain transformers and calling plain
`generate()` gives the engine's summaries with the evaluated settings, with no warning raised.
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetuneflow.contract.decoding import DecodingFields, GenerationSettings
from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.io import atomic_write_json, atomic_write_text, read_json_object
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord, describe_inputs, portable, read_record, write_record
from finetuneflow.contract.safety import check_output_dir, replace_dir
from finetuneflow.contract.settings import FromConfig
from finetuneflow.model.family import CAUSAL, CAUSAL_DEFAULTS, SEQ2SEQ
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
from finetuneflow.ship.source import ModelFolder, inspect_model_folder

if TYPE_CHECKING:   # the parity toolkit (torch, datasets) loads only once the checks have passed
    from finetuneflow.ship import parity

STAGE = "post_merge_cleanup"
GENERATION_FILE = "generation_config.json"
REWRITTEN = {"config.json", GENERATION_FILE, "run_config.json", "README.md", "cleanup_report.json"}
SAMPLING_ONLY = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "typical_p": 1.0, "min_p": None,
                 "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
DECODER_START = {"t5": "pad", "mt5": "pad", "umt5": "pad", "longt5": "pad", "pegasus": "pad"}  # else eos (BART)


@dataclass(frozen=True)
class CleanupSettings(FromConfig, DecodingFields):
    """The stage's settings; the decoding fields (DecodingFields) override the evaluated ones."""
    model: str
    output_dir: str
    overwrite: bool = False
    verify_samples: int = 2
    device: str | None = None


class Changes:
    """Every edit the cleanup makes, with the reason, for cleanup_report.json."""

    def __init__(self):
        self.items: list[dict] = []

    def set(self, target, file: str, key: str, value, why: str) -> None:
        before = getattr(target, key, None)
        if before != value:
            setattr(target, key, value)
            self.items.append({"file": file, "key": key, "before": before, "after": value, "why": why})

    def note(self, file: str, key: str, before, after, why: str) -> None:
        self.items.append({"file": file, "key": key, "before": before, "after": after, "why": why})


# ----------------------------------------------------------------------------- the cleaning steps

def move_generation_keys(raw_config: dict, config, generation, changes: Changes) -> None:
    """Generation parameters left in config.json (transformers 4 read them from there)."""
    from transformers import GenerationConfig
    generation_keys = set(GenerationConfig._get_default_generation_params()) - {"use_cache"}
    declared = set(type(config).__dataclass_fields__) if hasattr(type(config), "__dataclass_fields__") else set()
    for key in sorted(generation_keys & set(raw_config) - declared):
        value = raw_config[key]
        if getattr(generation, key, None) is None and value is not None:
            changes.set(generation, GENERATION_FILE, key, value, "moved from config.json")
        changes.note("config.json", key, value, None, "generation parameter removed from the model config")


def strip_task_params(config, changes: Changes) -> None:
    """task_specific_params keep only a task prefix (T5's "summarize: "): their decoding keys would
    override the evaluated defaults in transformers 4's summarization pipeline."""
    params = getattr(config, "task_specific_params", None)
    if not params:
        return
    kept = {task: {k: v for k, v in entry.items() if k == "prefix"} for task, entry in params.items()}
    kept = {task: entry for task, entry in kept.items() if entry}
    changes.note("config.json", "task_specific_params", params, kept or None,
                 "decoding keys in task_specific_params fight the evaluated generation settings")
    config.task_specific_params = kept or None


def fix_special_tokens(config, generation, tokenizer, family: str, changes: Changes) -> None:
    """pad/bos/eos and the decoder start token, checked against the tokenizer."""
    from finetuneflow.model.prompts import stop_token_ids
    vocab = len(tokenizer)
    changes.set(generation, GENERATION_FILE, "pad_token_id", tokenizer.pad_token_id, "the tokenizer's pad token")
    if tokenizer.bos_token_id is not None:
        changes.set(generation, GENERATION_FILE, "bos_token_id", tokenizer.bos_token_id, "the tokenizer's bos token")
    if family == CAUSAL:
        stops = stop_token_ids(tokenizer)
        changes.set(generation, GENERATION_FILE, "eos_token_id", stops[0] if len(stops) == 1 else stops,
                    "stop on EOS and the chat template's end-of-turn token, as the evaluation did")
        for key in ("forced_bos_token_id", "decoder_start_token_id", "forced_eos_token_id"):
            changes.set(generation, GENERATION_FILE, key, None, "not used by a decoder-only model")
        return
    changes.set(generation, GENERATION_FILE, "eos_token_id", tokenizer.eos_token_id, "the tokenizer's eos token")
    start = generation.decoder_start_token_id
    if start is None or not 0 <= start < vocab:
        start = config.decoder_start_token_id
    if start is None or not 0 <= start < vocab:
        start = tokenizer.pad_token_id if DECODER_START.get(config.model_type) == "pad" else tokenizer.eos_token_id
    changes.set(generation, GENERATION_FILE, "decoder_start_token_id", start, "the token decoding starts from")
    for key in ("forced_bos_token_id", "forced_eos_token_id"):
        value = getattr(generation, key, None)
        if value is not None and not 0 <= value < vocab:
            changes.set(generation, GENERATION_FILE, key, None, f"id outside the tokenizer's {vocab} tokens")


def apply_evaluated(generation, evaluated: dict, family: str, changes: Changes) -> None:
    """The evaluated decoding settings (what the shared engine used) become the defaults."""
    settings = {k: v for k, v in evaluated.items() if v is not None}
    if family == CAUSAL:
        settings = {**CAUSAL_DEFAULTS, **settings}
    if family == CAUSAL and settings.get("no_repeat_ngram_size"):
        # transformers would apply it to prompt + summary, forbidding copying names from the
        # dialogue; the engine applies it to the summary only (GeneratedNoRepeatNGram).
        changes.note(GENERATION_FILE, "no_repeat_ngram_size", settings.pop("no_repeat_ngram_size"), None,
                     "decoder-only: generate() needs finetuneflow.model.backends.hf.GeneratedNoRepeatNGram for "
                     "the evaluated no-repeat rule (transformers' own counts the prompt)")
        changes.set(generation, GENERATION_FILE, "no_repeat_ngram_size", None, "see the note above")
    for key, value in settings.items():
        changes.set(generation, GENERATION_FILE, key, value, "evaluated setting (run_config.json 'generation')")
    if settings.get("max_new_tokens") is not None:
        changes.set(generation, GENERATION_FILE, "max_length", None, "max_new_tokens sets the length")
    if settings.get("min_new_tokens") is not None:
        changes.set(generation, GENERATION_FILE, "min_length", None, "min_new_tokens sets the minimum")
    changes.set(generation, GENERATION_FILE, "do_sample", False, "summaries are decoded deterministically")


def drop_unused_flags(generation, changes: Changes) -> None:
    """Sampling knobs under deterministic decoding, beam-only flags under greedy decoding."""
    for key, neutral in SAMPLING_ONLY.items():
        if getattr(generation, key, None) not in (None, neutral):
            changes.set(generation, GENERATION_FILE, key, None, "only used when sampling")
    if getattr(generation, "_from_model_config", None):
        changes.set(generation, GENERATION_FILE, "_from_model_config", None,
                    "written here, no longer derived from config.json (transformers 4 would re-derive it)")
    if (generation.num_beams or 1) <= 1:
        if generation.early_stopping:
            changes.set(generation, GENERATION_FILE, "early_stopping", None, "early_stopping needs num_beams > 1")
        if generation.length_penalty not in (None, 1.0):
            changes.set(generation, GENERATION_FILE, "length_penalty", None, "length_penalty needs num_beams > 1")


def clean_configs(raw_config: dict, config, generation, tokenizer, family: str, evaluated: dict) -> Changes:
    """Make config/generation_config consistent (in place); returns every change with its reason."""
    changes = Changes()
    move_generation_keys(raw_config, config, generation, changes)
    strip_task_params(config, changes)
    fix_special_tokens(config, generation, tokenizer, family, changes)
    apply_evaluated(generation, evaluated, family, changes)
    drop_unused_flags(generation, changes)
    return changes


# ----------------------------------------------------------------------------- verification

@contextmanager
def capture_warnings():
    """Collect Python warnings and transformers log records (warning and above) in a list."""
    import logging
    import warnings
    from transformers.utils import logging as hf_logging
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            found.append(f"transformers: {record.getMessage()}")

    handler = Collect(level=logging.WARNING)
    root = hf_logging.get_logger("transformers")
    for cached in (getattr(logging.Logger, "warning_once", None), getattr(logging.Logger, "info_once", None)):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()    # a message already shown once would otherwise be hidden
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        found.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        root.removeHandler(handler)


def _plain_generate(model, tokenizer, ids: list[int], family: str, evaluated: dict, device) -> str:
    """What a user's plain `generate()` returns for the engine's prompt ids."""
    import torch
    from transformers import LogitsProcessorList
    from finetuneflow.model.backends.hf import GeneratedNoRepeatNGram
    inputs = torch.tensor([ids], device=device)
    extra = {}
    if family != SEQ2SEQ and evaluated.get("no_repeat_ngram_size"):
        extra["logits_processor"] = LogitsProcessorList(
            [GeneratedNoRepeatNGram(evaluated["no_repeat_ngram_size"], len(ids))])
    with torch.inference_mode():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), **extra)
    new = out[0, len(ids):] if family != SEQ2SEQ else out[0]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def _load_plain(folder: Path, family: str, device, dtype):
    """The folder as a user loads it (plain transformers), and a tokenizer with the engine's rules."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from finetuneflow.model.loading import fix_tokenizer
    auto = AutoModelForSeq2SeqLM if family == SEQ2SEQ else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(folder, dtype=dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:   # corrupt files that survived the checks: one line, nothing written
        raise UserError(f"the cleaned folder does not load with plain transformers: {first_line(exc, 240)}") from None
    engine_tokenizer = AutoTokenizer.from_pretrained(folder)
    fix_tokenizer(engine_tokenizer, family, model.config)
    return model, tokenizer, engine_tokenizer


def verify_clean(folder: Path, family: str, probes: list[dict], instruction: str, limit: int, evaluated: dict,
                 device, dtype, expected_logits: list) -> tuple[parity.ParityReport, list[str], str | None]:
    """Load `folder` with plain transformers and call plain `generate()` on the engine's prompts,
    capturing every warning; compare with the engine (evaluated settings) and with the source's
    logits. Returns (the parity report, the warnings, why the generation config is invalid)."""
    from finetuneflow.engine.generation import encode
    from finetuneflow.ship import parity
    with capture_warnings() as found:
        model, tokenizer, engine_tokenizer = _load_plain(folder, family, device, dtype)
        loaded = parity.as_loaded(model, engine_tokenizer, family, device, str(folder))
        plain = [_plain_generate(model, tokenizer, encode(loaded, p["dialogue"], instruction, limit)[0], family,
                                 evaluated, device) for p in probes]
    try:
        model.generation_config.validate(strict=True)
        invalid = None
    except ValueError as exc:
        invalid = first_line(exc, 300)
    engine = parity.summaries(loaded, probes, GenerationSettings(**evaluated), instruction, limit).summaries
    rows, agreement = parity.side_by_side(probes, engine, plain, ("engine", "plain_generate"))
    items = parity.teacher_forced(loaded, probes, instruction, limit)
    measured = parity.compare(expected_logits, parity.logits(loaded, items))
    failures = [f"warning: {w[:200]}" for w in found] + ([f"invalid generation config: {invalid}"] if invalid else [])
    report = parity.report("cleanup", str(dtype).removeprefix("torch."), measured, probes, rows, agreement,
                           extra_failures=failures)
    return report, found, invalid


# ----------------------------------------------------------------------------- the stage

def read_configs(source: ModelFolder):
    """(config, generation config, tokenizer) of the source folder, or one line naming what is wrong."""
    from transformers import GenerationConfig
    from finetuneflow.model.loading import load_config, load_tokenizer
    config = load_config(str(source.path))
    try:
        generation = (GenerationConfig.from_pretrained(source.path) if (source.path / GENERATION_FILE).is_file()
                      else GenerationConfig())
    except Exception as exc:   # invalid JSON or values
        raise UserError(f"{source.path / GENERATION_FILE} is unreadable ({first_line(exc, 200)}); restore it or "
                        f"delete it to start from the model's defaults") from None
    return config, generation, load_tokenizer(str(source.path), source.family, config)


def source_logits(source: ModelFolder, probes: list[dict], instruction: str, limit: int, device, dtype) -> list:
    """The source folder's teacher-forced logits: the cleaned copy must compute the same."""
    from finetuneflow.ship import parity
    from finetuneflow.model.loading import load_model
    loaded = load_model(str(source.path), device=device, dtype=dtype)
    found = parity.logits(loaded, parity.teacher_forced(loaded, probes, instruction, limit))
    del loaded
    return found


def evaluated_settings(source: ModelFolder, settings: CleanupSettings, log=print) -> dict:
    upstream = source.record
    if not upstream.generation:
        log(f"note: {source.path}/run_config.json records no evaluated generation settings; the model's own "
            f"generation config is kept except where set here")
    evaluated = upstream.generation.overrides() if upstream.generation else {}
    evaluated.update(settings.generation().overrides())
    return evaluated


def already_cleaned(source: ModelFolder, settings: CleanupSettings) -> tuple[Path, dict] | None:
    """(OUTPUT_DIR, its cleanup report) when OUTPUT_DIR holds this stage's cleanup of this very source
    (same folder, same file contents) with the same evaluated settings and VERIFY_SAMPLES: a re-run
    has nothing to do (OVERWRITE=True redoes it). None otherwise: the output-safety rule decides."""
    out = resolve(settings.output_dir)
    try:
        existing = read_record(out) if not settings.overwrite and out.is_dir() else None
    except UserError:   # an unreadable record: not this stage's finished output
        return None
    if existing is None or existing.stage != STAGE or not (out / "cleanup_report.json").is_file() \
            or not existing.lineage.cleaned_from \
            or resolve(existing.lineage.cleaned_from).resolve() != Path(source.path).resolve():
        return None
    same_settings = (existing.generation.overrides() if existing.generation else {}) == \
        evaluated_settings(source, settings, log=lambda *_: None) \
        and existing.config.get("VERIFY_SAMPLES") == settings.verify_samples
    if not same_settings or list(existing.inputs.values()) != list(describe_inputs([source.path]).values()):
        return None
    return out, read_json_object(out / "cleanup_report.json", "pass --OVERWRITE=True to clean again")


def clean(settings: CleanupSettings, provenance: dict | None = None, log=print) -> dict:
    """Clean MODEL into OUTPUT_DIR, verify, and return the cleanup report (the earlier one, with
    "skipped": True, when OUTPUT_DIR already holds this cleanup: `already_cleaned`)."""
    source = inspect_model_folder(settings.model, produced_by="merge_bart_lora.py")
    done = already_cleaned(source, settings)
    if done is not None:
        log(f"skip: {done[0]} already holds the cleanup of {source.path} with these settings; pass "
            f"--OVERWRITE=True to clean it again")
        return {**done[1], "skipped": True}
    out = check_output_dir(settings.output_dir, stage=STAGE, inputs=[source.path], overwrite=settings.overwrite)
    from finetuneflow.model.device import default_dtype, parse_device   # torch: after the checks
    from finetuneflow.ship import parity
    evaluated = evaluated_settings(source, settings, log)
    config, generation, tokenizer = read_configs(source)
    changes = clean_configs(source.config, config, generation, tokenizer, source.family, evaluated)
    instruction = source.record.instruction or DEFAULT_INSTRUCTION
    limit = int(source.record.max_input_length or tokenizer.model_max_length)
    probes, _ = parity.load_probes(None, settings.verify_samples)
    device = parse_device(settings.device)
    dtype = default_dtype(device)
    expected = source_logits(source, probes, instruction, limit, device, dtype)
    with replace_dir(out) as tmp:
        write_cleaned(source, tmp, config, generation)
        verification, warned, invalid = verify_clean(tmp, source.family, probes, instruction, limit, evaluated,
                                                     device, dtype, expected)
        report = {"source": portable(source.path), "family": source.family, "evaluated_generation": evaluated,
                  "changes": changes.items, "generation_config": generation.to_diff_dict(),
                  "verification": {**verification.to_dict(), "warnings": warned,
                                   "generation_config_invalid": invalid}}
        print_changes(changes, log)
        log(f"verification (plain generate() vs the engine, cleaned vs source logits): {verification.line()}")
        if not verification.passed:
            raise UserError(f"verification failed ({len(verification.failures)} problems; first: "
                            f"{verification.failures[0][:200]}); nothing was written")
        atomic_write_json(tmp / "cleanup_report.json", report)
        atomic_write_text(tmp / "README.md", card_text(source, generation, evaluated))
        write_record(tmp, cleaned_record(source, instruction, limit, evaluated), provenance or vars(settings),
                     [source.path])
    log(f"verified: loads and generates with no warnings; plain generate() matches the evaluated outputs "
        f"on {len(probes)} dialogues")
    log(f"wrote {out} (cleanup_report.json lists every change); next: python inference_bart_lora.py "
        f"--model={settings.output_dir}")
    return report


def write_cleaned(source: ModelFolder, tmp: Path, config, generation) -> None:
    """The source's files (weights and tokenizer unchanged) with the cleaned configs."""
    for item in source.path.iterdir():
        if item.is_file() and item.name not in REWRITTEN:
            shutil.copy2(item, tmp / item.name)
    config.save_pretrained(tmp)
    try:
        generation.save_pretrained(tmp)   # validates strictly: an inconsistent config cannot be saved
    except ValueError as exc:
        raise UserError(f"the cleaned generation config is still invalid: {first_line(exc, 240)}") from None


def print_changes(changes: Changes, log=print) -> None:
    log(f"{len(changes.items)} changes:")
    for change in changes.items:
        log(f"  {change['file']}: {change['key']} {change['before']!r} -> {change['after']!r} ({change['why']})")


def card_text(source: ModelFolder, generation, evaluated: dict) -> str:
    card = (source.path / "README.md").read_text(encoding="utf-8") if (source.path / "README.md").is_file() else ""
    defaults = {k: v for k, v in generation.to_diff_dict().items() if k != "transformers_version"}
    note = (" (decoder-only with a no-repeat rule: pass finetuneflow.model.backends.hf.GeneratedNoRepeatNGram as a "
            "logits processor, see cleanup_report.json)" if source.family != SEQ2SEQ
            and evaluated.get("no_repeat_ngram_size") else "")
    return (card.rstrip() + "\n\n## Generation defaults (post_merge_cleanup.py)\n`generation_config.json` holds the "
            "evaluated settings, so a plain `generate()` reproduces the evaluated summaries" + note
            + f":\n\n```json\n{json.dumps(defaults, indent=2)}\n```\n")


def cleaned_record(source: ModelFolder, instruction: str, limit: int, evaluated: dict) -> RunRecord:
    upstream = source.record
    carried = upstream.carried()
    carried.update(family=source.family, instruction=instruction, max_input_length=limit,
                   generation=GenerationSettings(**evaluated))
    record = RunRecord(STAGE, **carried, dtype=upstream.dtype, backend="transformers",
                       extra={"lora": upstream.extra.get("lora")})
    record.lineage.cleaned_from = portable(source.path)
    return record
