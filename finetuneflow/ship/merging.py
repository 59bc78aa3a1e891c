"""Merging a LoRA adapter into its base, and the proof that the merge changed nothing.

Parity: on a few real dialogues, the adapter model (base + LoRA) and the merged model are fed
the same teacher-forced input (the engine's prompt + the reference summary); the largest
absolute difference of their logits is measured, and both decode the same probes greedily
through the shared engine: the summaries must be identical. The adapter's own effect (base vs
base + LoRA) is measured too, so a parity pass cannot come from an adapter that does nothing.
"""
from __future__ import annotations

import copy
import csv
import json
from contextlib import contextmanager
from pathlib import Path

import torch

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.engine.generation import encode, summarize
from finetuneflow.model.backends.hf import BACKEND as HF
from finetuneflow.model.backends.hf import GeneratedNoRepeatNGram, unwrap
from finetuneflow.model.family import CAUSAL_DEFAULTS, SEQ2SEQ, family_of
from finetuneflow.model.loading import LoadedModel, fix_tokenizer
from finetuneflow.model.prompts import text_ids
from finetuneflow.contract.paths import BUNDLED_SAMPLES, resolve

# fp32 must be exact to rounding; half precision rounds the merged weights (W + BA) once more.
LOGIT_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_METRIC_WORDS = ("rouge", "bert", "bleu", "chrf", "meteor")


def has_model_weights(folder: Path) -> bool:
    return any((Path(folder) / name).is_file() for name in MODEL_FILES)


def probe_dialogues(dataset: str | None, n: int) -> tuple[list[dict], str]:
    """`n` rows {id, dialogue, summary} of typical length (around the median) from a local
    data file (else the bundled samples), and where they came from."""
    path = resolve(dataset) if dataset else None
    if not path or not path.is_file():
        path = BUNDLED_SAMPLES
    from finetuneflow.contract.data import load_dialogues
    data = load_dialogues(str(path), seed=42, val_fraction=0.0, test_fraction=0.0)
    rows = [dict(r) for split in data.splits.values() for r in split]
    rows.sort(key=lambda r: (len(r["dialogue"]), r["id"]))
    start = max(0, len(rows) // 2 - n // 2)
    return rows[start:start + n], str(path)


def _teacher_forced_logits(loaded: LoadedModel, row: dict, instruction: str, max_input_length: int,
                           target_tokens: int) -> torch.Tensor:
    """Logits at every position that predicts a summary token, for the engine's input followed by
    the reference summary (teacher forcing). Prompt positions of a causal model are left out:
    they do not decide the output, and with a large vocabulary they would cost gigabytes."""
    tokenizer, model = loaded.tokenizer, loaded.model
    prompt, _ = encode(loaded, row["dialogue"], instruction, max_input_length)
    target = text_ids(tokenizer, row["summary"])[:target_tokens]
    with torch.inference_mode():
        if loaded.family == SEQ2SEQ:
            start = model.config.decoder_start_token_id
            out = model(input_ids=torch.tensor([prompt], device=loaded.device),
                        decoder_input_ids=torch.tensor([[start] + target], device=loaded.device))
        else:
            out = model(input_ids=torch.tensor([prompt + target], device=loaded.device))
            return out.logits[0, len(prompt) - 1:].float().cpu()
    return out.logits[0].float().cpu()


def parity_settings(max_new_tokens: int) -> GenerationSettings:
    """Plain greedy decoding: any difference between the two models shows up in the text."""
    return GenerationSettings(num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                              no_repeat_ngram_size=0, length_penalty=1.0)


@contextmanager
def _greedy_defaults(loaded: LoadedModel):
    """Beam-only flags of the model's generation config (BART-cnn's early_stopping) would make
    transformers warn on every greedy probe; they are cleared for the check and restored."""
    model = unwrap(loaded.model)
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.early_stopping = False
    try:
        yield
    finally:
        model.generation_config = saved


def _greedy(loaded: LoadedModel, rows: list[dict], instruction: str, max_input_length: int,
            max_new_tokens: int) -> list[str]:
    with _greedy_defaults(loaded):
        return summarize(loaded, [r["dialogue"] for r in rows], parity_settings(max_new_tokens), batch_size=1,
                         max_input_length=max_input_length, instruction=instruction, progress=False).summaries


def reference_outputs(adapter_model: LoadedModel, rows: list[dict], instruction: str, max_input_length: int,
                      max_new_tokens: int, target_tokens: int = 64) -> dict:
    """What the adapter model produces (logits, greedy summaries) and how far it is from its base."""
    logits = [_teacher_forced_logits(adapter_model, r, instruction, max_input_length, target_tokens) for r in rows]
    with adapter_model.model.disable_adapter():
        base = [_teacher_forced_logits(adapter_model, r, instruction, max_input_length, target_tokens) for r in rows]
    effect = max(float((a - b).abs().max()) for a, b in zip(logits, base))
    greedy = _greedy(adapter_model, rows, instruction, max_input_length, max_new_tokens)
    return {"logits": logits, "summaries": greedy, "adapter_effect": effect}


def compare(reference: dict, merged: LoadedModel, rows: list[dict], instruction: str, max_input_length: int,
            max_new_tokens: int, tolerance: float, target_tokens: int = 64) -> dict:
    """The parity report of a merged model against the adapter's reference outputs."""
    diffs = []
    for row, expected in zip(rows, reference["logits"]):
        got = _teacher_forced_logits(merged, row, instruction, max_input_length, target_tokens)
        diffs.append(float((got - expected).abs().max()))
    greedy = _greedy(merged, rows, instruction, max_input_length, max_new_tokens)
    same = [a == b for a, b in zip(reference["summaries"], greedy)]
    max_diff = max(diffs) if diffs else 0.0
    return {
        "passed": bool(rows) and all(same) and max_diff <= tolerance,
        "probes": len(rows), "max_abs_logit_diff": max_diff, "tolerance": tolerance,
        "identical_greedy_outputs": sum(same), "adapter_effect_max_abs_logit_diff": reference["adapter_effect"],
        "per_probe": [{"id": r["id"], "max_abs_logit_diff": d, "identical": s, "adapter": a, "merged": m}
                      for r, d, s, a, m in zip(rows, diffs, same, reference["summaries"], greedy)],
    }


def collect_metrics(metrics_dir: Path) -> list[dict]:
    """Scores recorded by the evaluation stages: summary_metrics.csv rows and *_eval.json files."""
    found: list[dict] = []
    table = metrics_dir / "summary_metrics.csv"
    if table.is_file():
        with open(table, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                found.append({"source": table.name, **row})
    for path in sorted(metrics_dir.glob("*_eval.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        scores = {}

        def walk(node, prefix=""):
            for key, value in (node.items() if isinstance(node, dict) else ()):
                name = f"{prefix}{key}"
                if isinstance(value, (int, float)) and not isinstance(value, bool) and any(
                        w in name.lower() for w in _METRIC_WORDS):
                    scores[name] = round(float(value), 4)
                elif isinstance(value, dict) and not prefix:
                    walk(value, f"{key}.")
        walk(data)
        model = data.get("model") or ""
        if isinstance(model, dict):   # eval_bart_lora.py records {"name", "base", "adapter", ...}
            model = model.get("name") or model.get("adapter") or model.get("base") or ""
        if scores:
            found.append({"source": path.name, "model": str(model), **scores})
    return found


def model_card(record: dict, report: dict, metrics: list[dict], metrics_dir: Path) -> str:
    """README.md for the merged folder (front matter for the Hub, then plain sections)."""
    family = record.get("family")
    lora = record.get("lora") or {}
    generation = {k: v for k, v in (record.get("generation") or {}).items() if v is not None}
    lines = ["---", "library_name: transformers", f"base_model: {record.get('base_model')}",
             f"pipeline_tag: {'summarization' if family == SEQ2SEQ else 'text-generation'}",
             "tags: [dialogue-summarization, lora, peft, finetuneflow]", "---", "",
             f"# {Path(record['merged_into']).name}: dialogue summarizer (LoRA merged)", "",
             "## Model", f"- Base model: `{record.get('base_model')}` ({family})",
             f"- Adapter merged: `{record.get('merged_from')}`"
             + (" (trained with QLoRA on a 4-bit base; merged into the full-precision base)"
                if record.get("load_in_4bit") else ""),
             f"- Weights: {record.get('dtype')}, safetensors",
             f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
             f"targets={lora.get('target_modules')}", "",
             "## Training data", f"- {record.get('dataset') or 'not recorded'}", "",
             "## How it is prompted",
             f"- Instruction: \"{record.get('instruction')}\"" if family != SEQ2SEQ else
             "- Input: the dialogue text (turns separated by newlines)",
             f"- Max input length: {record.get('max_input_length')} tokens",
             f"- Evaluated generation settings: {json.dumps(generation) if generation else 'the model defaults'}", "",
             "## Merge parity (adapter vs merged)",
             f"- {report['identical_greedy_outputs']}/{report['probes']} identical greedy summaries; "
             f"max |logit difference| {report['max_abs_logit_diff']:.2e} (tolerance {report['tolerance']:.0e}); "
             f"the adapter itself moves logits by up to {report['adapter_effect_max_abs_logit_diff']:.3g}", "",
             "## Metrics", ]
    if metrics:
        lines.append(f"Found in `{metrics_dir}` when merging (check which model each row refers to):")
        lines.append("")
        for row in metrics:
            lines.append("- " + ", ".join(f"{k}: {v}" for k, v in row.items() if v not in ("", None)))
    else:
        lines.append(f"No evaluation results were found in `{metrics_dir}`; run `python eval_bart_lora.py` "
                     "and `python eval_metrics_bart_lora.py`.")
    lines += ["", "## Intended use",
              "Summarizing English dialogues (chats, meetings, customer calls) similar to the training data, "
              "with a human reviewing the output.", "",
              "## Limits",
              "- Summaries can omit facts, misattribute who said what, or state things not in the dialogue.",
              f"- Inputs longer than {record.get('max_input_length')} tokens are truncated unless summarized in "
              "windows (`inference_bart_lora.py --LONG_INPUT=chunk`).",
              "- Quality was measured only on the data listed above; other domains and languages are untested.",
              "- Run `python post_merge_cleanup.py` before deploying: it makes the evaluated generation settings "
              "the defaults.", ""]
    return "\n".join(lines)


def tolerance_for(dtype: torch.dtype, override: float | None) -> float:
    if override is not None:
        return float(override)
    if dtype not in LOGIT_TOLERANCE:
        raise UserError(f"no parity tolerance known for {dtype}; pass --MAX_LOGIT_DIFF=<float>")
    return LOGIT_TOLERANCE[dtype]


# --- post-merge cleanup -------------------------------------------------------------------
SAMPLING_ONLY = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "typical_p": 1.0, "min_p": None,
                 "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
DECODER_START = {"t5": "pad", "mt5": "pad", "umt5": "pad", "longt5": "pad", "pegasus": "pad"}  # else eos (BART)


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


def clean_configs(raw_config: dict, config, generation, tokenizer, family: str, evaluated: dict) -> Changes:
    """Make config/generation_config consistent (in place): generation parameters only in the
    generation config, special tokens matching the tokenizer, the evaluated decoding settings as
    the defaults, no flags that the chosen decoding ignores, no task_specific_params that fight them."""
    from transformers import GenerationConfig
    from finetuneflow.model.prompts import stop_token_ids
    changes, gen_file = Changes(), "generation_config.json"
    generation_keys = set(GenerationConfig._get_default_generation_params()) - {"use_cache"}
    declared = set(type(config).__dataclass_fields__) if hasattr(type(config), "__dataclass_fields__") else set()
    # 1. Generation parameters left in config.json (transformers 4 read them from there).
    for key in sorted(generation_keys & set(raw_config) - declared):
        value = raw_config[key]
        if getattr(generation, key, None) is None and value is not None:
            changes.set(generation, gen_file, key, value, "moved from config.json")
        changes.note("config.json", key, value, None, "generation parameter removed from the model config")
    # 2. task_specific_params: only a task prefix (T5's "summarize: ") is kept; their decoding keys
    #    would override the evaluated defaults in transformers 4's summarization pipeline.
    params = getattr(config, "task_specific_params", None)
    if params:
        kept = {task: {k: v for k, v in entry.items() if k == "prefix"} for task, entry in params.items()}
        kept = {task: entry for task, entry in kept.items() if entry}
        changes.note("config.json", "task_specific_params", params, kept or None,
                     "decoding keys in task_specific_params fight the evaluated generation settings")
        config.task_specific_params = kept or None
    # 3. Special tokens, checked against the tokenizer.
    vocab = len(tokenizer)
    changes.set(generation, gen_file, "pad_token_id", tokenizer.pad_token_id, "the tokenizer's pad token")
    if tokenizer.bos_token_id is not None:
        changes.set(generation, gen_file, "bos_token_id", tokenizer.bos_token_id, "the tokenizer's bos token")
    if family == "causal":
        stops = stop_token_ids(tokenizer)
        changes.set(generation, gen_file, "eos_token_id", stops[0] if len(stops) == 1 else stops,
                    "stop on EOS and the chat template's end-of-turn token, as the evaluation did")
        for key in ("forced_bos_token_id", "decoder_start_token_id", "forced_eos_token_id"):
            changes.set(generation, gen_file, key, None, "not used by a decoder-only model")
    else:
        changes.set(generation, gen_file, "eos_token_id", tokenizer.eos_token_id, "the tokenizer's eos token")
        start = generation.decoder_start_token_id
        if start is None or not 0 <= start < vocab:
            start = config.decoder_start_token_id
        if start is None or not 0 <= start < vocab:
            start = tokenizer.pad_token_id if DECODER_START.get(config.model_type) == "pad" else tokenizer.eos_token_id
        changes.set(generation, gen_file, "decoder_start_token_id", start, "the token decoding starts from")
        for key in ("forced_bos_token_id", "forced_eos_token_id"):
            value = getattr(generation, key, None)
            if value is not None and not 0 <= value < vocab:
                changes.set(generation, gen_file, key, None, f"id outside the tokenizer's {vocab} tokens")
    # 4. The evaluated decoding settings become the defaults (what the shared engine used).
    settings = {k: v for k, v in evaluated.items() if v is not None}
    if family == "causal":
        settings = {**CAUSAL_DEFAULTS, **settings}
    if family == "causal" and settings.get("no_repeat_ngram_size"):
        # transformers would apply it to prompt + summary, forbidding copying names from the
        # dialogue; the engine applies it to the summary only (generation.GeneratedNoRepeatNGram).
        changes.note(gen_file, "no_repeat_ngram_size", settings.pop("no_repeat_ngram_size"), None,
                     "decoder-only: generate() needs finetuneflow.model.backends.hf.GeneratedNoRepeatNGram for "
                     "the evaluated no-repeat rule (transformers' own counts the prompt)")
        changes.set(generation, gen_file, "no_repeat_ngram_size", None, "see the note above")
    for key, value in settings.items():
        changes.set(generation, gen_file, key, value, "evaluated setting (run_config.json 'generation')")
    if settings.get("max_new_tokens") is not None:
        changes.set(generation, gen_file, "max_length", None, "max_new_tokens sets the length")
    if settings.get("min_new_tokens") is not None:
        changes.set(generation, gen_file, "min_length", None, "min_new_tokens sets the minimum")
    changes.set(generation, gen_file, "do_sample", False, "summaries are decoded deterministically")
    for key, neutral in SAMPLING_ONLY.items():
        if getattr(generation, key, None) not in (None, neutral):
            changes.set(generation, gen_file, key, None, "only used when sampling")
    if getattr(generation, "_from_model_config", None):
        changes.set(generation, gen_file, "_from_model_config", None,
                    "written here, no longer derived from config.json (transformers 4 would re-derive it)")
    if (generation.num_beams or 1) <= 1:
        if generation.early_stopping:
            changes.set(generation, gen_file, "early_stopping", None, "early_stopping needs num_beams > 1")
        if generation.length_penalty not in (None, 1.0):
            changes.set(generation, gen_file, "length_penalty", None, "length_penalty needs num_beams > 1")
    return changes


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


def verify_clean(folder: Path, rows: list[dict], instruction: str, max_input_length: int, evaluated: dict,
                 device: torch.device) -> dict:
    """Load `folder` with plain transformers and call plain `generate()` on the engine's prompts,
    capturing every warning; then check the engine with the evaluated settings agrees."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                              LogitsProcessorList)
    import tempfile
    with capture_warnings() as found:
        config = AutoConfig.from_pretrained(folder)
        family = family_of(config)
        auto = AutoModelForSeq2SeqLM if family == SEQ2SEQ else AutoModelForCausalLM
        model = auto.from_pretrained(folder).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        engine_tokenizer = AutoTokenizer.from_pretrained(folder)
        fix_tokenizer(engine_tokenizer, family, config)
        loaded = LoadedModel(model=model, tokenizer=engine_tokenizer, family=family, backend=HF, name=str(folder),
                             base=str(folder), device=device, config=model.config,
                             generation_config=model.generation_config)
        plain = []
        for row in rows:
            ids, _ = encode(loaded, row["dialogue"], instruction, max_input_length)
            inputs = torch.tensor([ids], device=device)
            extra = {}
            if family != SEQ2SEQ and evaluated.get("no_repeat_ngram_size"):
                extra["logits_processor"] = LogitsProcessorList(
                    [GeneratedNoRepeatNGram(evaluated["no_repeat_ngram_size"], len(ids))])
            with torch.inference_mode():
                out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), **extra)
            new = out[0, len(ids):] if family != SEQ2SEQ else out[0]
            plain.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        with tempfile.TemporaryDirectory() as scratch:
            model.config.save_pretrained(scratch)
            model.generation_config.save_pretrained(scratch)
    try:
        model.generation_config.validate(strict=True)
        invalid = None
    except ValueError as exc:
        invalid = str(exc)
    engine = summarize(loaded, [r["dialogue"] for r in rows], GenerationSettings(**evaluated), batch_size=1,
                       max_input_length=max_input_length, instruction=instruction, progress=False)
    return {"warnings": found, "generation_config_invalid": invalid, "probes": [r["id"] for r in rows],
            "plain_generate": plain, "engine": engine.summaries,
            "plain_generate_matches_engine": plain == engine.summaries,
            "passed": not found and invalid is None and plain == engine.summaries}
