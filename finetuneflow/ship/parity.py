"""The one parity toolkit: does model B still compute what model A computed?

Every ship step proves itself with it: the merge (base + LoRA vs the merged weights), the cleanup
(the source folder vs the cleaned one, and plain `generate()` vs the engine), the exports (the
Hugging Face model vs its GGUF or CTranslate2 copy) and the GGUF import (the GGUF-loaded model vs
the saved folder). The steps are always the same:

1. probe dialogues with reference summaries (`load_probes`);
2. teacher forcing: each probe's prompt (the engine's encoding) followed by its reference summary
   (`teacher_forced`), scored through the model's backend: `backend.logits` (the rows that predict
   the summary tokens) or `backend.token_log_probs` (runtimes without full logits, such as
   CTranslate2's Translator);
3. `compare` -> {quantity, max_abs, mean_abs, argmax_agreement, positions};
4. greedy summaries of both, `side_by_side`;
5. `judge` against ONE table, `THRESHOLDS[(check, dtype or outtype)]`, and one report schema,
   `ParityReport`: {check, key, measured, thresholds, passed, failures, probes}.

A check that compared nothing fails ("no probe tokens were compared"), and so does a
non-finite measurement: a report can only pass on real numbers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from finetuneflow.contract.data import get_split, load_as_recorded, load_dialogues, subset
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import BUNDLED_SAMPLES, CODE_ROOT, resolve
from finetuneflow.contract.record import Split
from finetuneflow.engine.generation import GenerationResult, encode, summarize
from finetuneflow.model.family import CAUSAL
from finetuneflow.model.loaded import LoadedModel

# (check, dtype or output type) -> limits on the measured numbers. "max_abs"/"mean_abs" bound the
# absolute difference of the measured quantity (logits, or log-probabilities for CTranslate2);
# "min_*" are lower bounds (argmax agreement, fraction of identical greedy summaries).
THRESHOLDS: dict[tuple[str, str], dict[str, float]] = {
    # merge: base + LoRA vs W + BA in the same dtype. fp32 is exact up to rounding; half precision
    # rounds the merged weights once more.
    ("merge", "float32"): {"max_abs": 1e-3, "min_identical_summaries": 1.0},
    ("merge", "float16"): {"max_abs": 5e-2, "min_identical_summaries": 1.0},
    ("merge", "bfloat16"): {"max_abs": 2.5e-1, "min_identical_summaries": 1.0},
    # cleanup: the weights are copied unchanged, only the configs change; plain generate() must
    # give the engine's summaries
    ("cleanup", "float32"): {"max_abs": 1e-5, "min_identical_summaries": 1.0},
    ("cleanup", "float16"): {"max_abs": 1e-2, "min_identical_summaries": 1.0},
    ("cleanup", "bfloat16"): {"max_abs": 5e-2, "min_identical_summaries": 1.0},
    # GGUF, logits at every position of prompt + summary. Measured on SmolLM2-135M (4 probes, logits up to 43):
    # f32 0 / 100%, f16 0.04 / 100%, bf16 0.28 / 99.8%, q8_0 1.9 / 98.5% (max |diff| / argmax).
    ("gguf", "f32"): {"max_abs": 1e-3, "min_argmax_agreement": 1.0},
    ("gguf", "f16"): {"max_abs": 0.5, "min_argmax_agreement": 0.99},   # llama.cpp reading: 0.16-0.23 (see below)
    ("gguf", "bf16"): {"max_abs": 1.0, "min_argmax_agreement": 0.98},
    ("gguf", "q8_0"): {"max_abs": 4.0, "min_argmax_agreement": 0.95},
    # llama.cpp's k-quants (ship/quantize.py, from an f16 GGUF), read back by llama.cpp, logits at every position.
    # Measured on SmolLM2-135M-Instruct (max |diff| / argmax agreement; 4 bundled probes, 1042 positions | 8
    # DialogSum dev rows, 2360 positions): f16 0.16/99.9% | 0.23/99.96%, q8_0 3.05/98.1% | 2.79/97.1%,
    # q6_k 4.12/95.1% | 4.12/95.4%, q5_k_m 13.2/83.2% | 13.2/86.1%, q4_k_m 9.69/90.3% | 12.8/91.2%. Its
    # 576-wide rows are not multiples of a k-quant block (256), so llama.cpp writes most tensors as q5_0/q5_1/q8_0
    # (the export report lists them): q5_k_m came out below q4_k_m here. Limits: ~1.5x the worst max |diff|,
    # ~5 points under the worst agreement. Task quality is the deploy gate's job (ship/deploy_gate.py).
    ("gguf", "q6_k"): {"max_abs": 7.0, "min_argmax_agreement": 0.90},
    ("gguf", "q5_k_m"): {"max_abs": 20.0, "min_argmax_agreement": 0.78},
    ("gguf", "q4_k_m"): {"max_abs": 20.0, "min_argmax_agreement": 0.85},
    ("gguf", "iq4_xs"): {"max_abs": 20.0, "min_argmax_agreement": 0.80},
    ("gguf", "q3_k_m"): {"max_abs": 25.0, "min_argmax_agreement": 0.70},
    # CTranslate2, log-probability of each reference token (its Translator returns no logits).
    # int8 also quantizes activations: SmolLM2-135M measured 0.24 mean / 2.2 max (float32 9e-6 / 5e-5).
    ("ct2", "float32"): {"max_abs": 1e-3},
    ("ct2", "float16"): {"mean_abs": 0.1},
    ("ct2", "bfloat16"): {"mean_abs": 0.2},
    ("ct2", "int8"): {"mean_abs": 0.4},
    ("ct2", "int8_float32"): {"mean_abs": 0.4},
    ("ct2", "int8_float16"): {"mean_abs": 0.4},
    ("ct2", "int8_bfloat16"): {"mean_abs": 0.4},
    # GGUF import: the saved float32 folder vs the GGUF-loaded (dequantized) model
    ("import", "float32"): {"max_abs": 1e-4},
}
TARGET_TOKENS = 128      # reference summary tokens scored per probe


# ----------------------------------------------------------------------------- probes

def load_probes(dataset: str | None, n: int, split: str = "all", seed: int = 42,
                recorded: Split | None = None) -> tuple[list[dict], str]:
    """`n` rows {id, dialogue, summary} of `split` (a seeded subset), and where they came from.
    No dataset: the bundled samples. A relative path that exists only under the code folder
    (the bundled samples with another FTF_ROOT) is found there. `recorded`: the dataset is a
    model's training data, read with the settings its record names (columns, fractions, ...)."""
    source = str(dataset) if dataset else str(BUNDLED_SAMPLES)
    if not resolve(source).exists() and (CODE_ROOT / source).exists():
        source = str(CODE_ROOT / source)
    data = load_as_recorded(recorded, source) if recorded is not None else load_dialogues(source, seed=seed)
    rows = [{"id": str(r["id"]), "dialogue": r["dialogue"], "summary": r["summary"]}
            for r in subset(get_split(data, split), n, seed)]
    if not rows:
        raise UserError(f"no probe dialogues in split {split!r} of {source}; choose another probe dataset or split")
    return rows, source


def teacher_forced(loaded: LoadedModel, probes: list[dict], instruction: str, limit: int,
                   target_tokens: int = TARGET_TOKENS) -> list[dict]:
    """Per probe: {id, prompt, target} ids (the engine's prompt, the reference summary with its end
    token) and the tensors a bare transformers model takes: `input_ids` (causal: prompt + target)
    and, for seq2seq, `labels`."""
    items = []
    for probe in probes:
        prompt, _ = encode(loaded, probe["dialogue"], instruction, limit)
        example = loaded.family.teacher_forced(loaded.tokenizer, prompt, probe["summary"], target_tokens)
        target = [t for t in example["labels"] if t != -100]
        item = {"id": probe["id"], "prompt": prompt, "target": target}
        if loaded.family == CAUSAL:
            item["input_ids"] = torch.tensor([example["input_ids"]])
        else:
            item.update(input_ids=torch.tensor([prompt]), labels=torch.tensor([target]))
        items.append(item)
    return items


# ----------------------------------------------------------------------------- scoring

def _summary_rows(loaded: LoadedModel, item: dict, rows):
    """The rows that predict the target tokens (a causal model's prompt positions do not decide
    the summary, and with a large vocabulary they would cost memory)."""
    start = len(item["prompt"]) - 1 if loaded.family == CAUSAL else 0
    return np.asarray(rows[start:start + len(item["target"])], dtype=np.float32)


def logits(loaded: LoadedModel, items: list[dict], positions: str = "summary") -> list[np.ndarray] | None:
    """Teacher-forced logits through the backend, at the summary positions, or at every position
    ("all": a causal model's prompt too, as the GGUF thresholds were calibrated); None when the
    runtime exposes no logits."""
    found = []
    for item in items:
        rows = loaded.backend.logits(loaded, item["prompt"], item["target"])
        if rows is None:
            return None
        found.append(np.asarray(rows, dtype=np.float32) if positions == "all" else _summary_rows(loaded, item, rows))
    return found


def log_probs(loaded: LoadedModel, items: list[dict]) -> list[np.ndarray]:
    """Teacher-forced log-probability of each target token, through the backend."""
    return [np.asarray(loaded.backend.token_log_probs(loaded, item["prompt"], item["target"]), dtype=np.float64)
            for item in items]


def compare(reference: list[np.ndarray], other: list[np.ndarray], quantity: str = "logits") -> dict:
    """{quantity, max_abs, mean_abs, positions, per_probe_max_abs} and, for logits, argmax_agreement.
    Each probe is compared over the positions both sides scored."""
    total, count, worst, agree, per_probe = 0.0, 0, None, 0, []
    for a, b in zip(reference, other):
        n = min(len(a), len(b))
        a, b = np.asarray(a[:n], dtype=np.float64), np.asarray(b[:n], dtype=np.float64)
        if n == 0:
            per_probe.append(None)
            continue
        delta = np.abs(a - b)
        probe_max = float(delta.max())
        per_probe.append(probe_max)
        worst = probe_max if worst is None or not probe_max <= worst else worst
        total += float(delta.mean()) * n
        count += n
        if a.ndim == 2:
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    measured = {"quantity": quantity, "max_abs": worst, "mean_abs": total / count if count else None,
                "positions": count, "per_probe_max_abs": per_probe}
    if reference and np.asarray(reference[0]).ndim == 2:
        measured["argmax_agreement"] = agree / count if count else None
    return measured


def side_by_side(probes: list[dict], first: list[str], second: list[str],
                 labels: tuple[str, str] = ("reference", "other")) -> tuple[list[dict], dict]:
    """Rows {id, <label 1>, <label 2>, identical} and the agreement: identical count and the
    ROUGE-L of the second side against the first."""
    from finetuneflow.quality.metrics import rouge_per_sample
    rows = [{"id": p["id"], labels[0]: a, labels[1]: b, "identical": a == b} for p, a, b in zip(probes, first, second)]
    rouge = rouge_per_sample(second, first) if rows else []
    agreement = {"identical": sum(r["identical"] for r in rows), "of": len(rows),
                 f"rougeL_{labels[1]}_vs_{labels[0]}": round(sum(x["rougeL"] for x in rouge) / max(1, len(rouge)), 2)}
    return rows, agreement


def greedy_settings(max_new_tokens: int, min_new_tokens: int | None = None) -> GenerationSettings:
    """Plain greedy decoding (no n-gram rule, no length penalty): any difference between two models
    shows in the text, and it is what llama.cpp and Ollama run."""
    return GenerationSettings(num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or 0,
                              no_repeat_ngram_size=0, length_penalty=1.0)


def summaries(loaded: LoadedModel, probes: list[dict], settings: GenerationSettings, instruction: str,
              limit: int, batch_size: int = 1) -> GenerationResult:
    return summarize(loaded, [p["dialogue"] for p in probes], settings, batch_size=batch_size, max_input_length=limit,
                     instruction=instruction, progress=False)


def as_loaded(model, tokenizer, family, device, name: str) -> LoadedModel:
    """A bare transformers model (read from a GGUF file, or loaded by plain transformers) behind the
    transformers backend, so the engine and the scoring functions take it."""
    from finetuneflow.model.backends.hf import BACKEND
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, backend=BACKEND, name=name, base=name,
                       device=device, config=model.config, generation_config=model.generation_config)


# ----------------------------------------------------------------------------- judging

def thresholds_for(check: str, key: str, overrides: dict | None = None) -> dict:
    """The table's limits for (check, key), with `overrides` (a user's tolerance) applied."""
    if (check, key) not in THRESHOLDS:
        known = ", ".join(k for c, k in THRESHOLDS if c == check)
        raise UserError(f"no {check} parity thresholds for {key!r} (known: {known})")
    return {**THRESHOLDS[(check, key)], **{k: v for k, v in (overrides or {}).items() if v is not None}}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def judge(measured: dict, thresholds: dict) -> list[str]:
    """One line per failed limit; a measurement over zero positions, or a missing or non-finite
    number, fails."""
    failures = []
    if not measured.get("positions"):
        failures.append("no probe tokens were compared: nothing was verified")
    for name, limit in thresholds.items():
        key = name[4:] if name.startswith("min_") else name
        value = measured.get(key)
        if not _finite(value):
            failures.append(f"{key} is {value} (not a finite measurement)")
        elif name.startswith("min_") and value < limit:
            failures.append(f"{key} {value:.4f} < {limit}")
        elif not name.startswith("min_") and value > limit:
            failures.append(f"{key} {value:.4g} > {limit}")
    return failures


@dataclass
class ParityReport:
    """The one report schema every ship step writes."""
    check: str                      # merge | cleanup | gguf | ct2 | import
    key: str                        # dtype or output type the thresholds are for
    measured: dict
    thresholds: dict
    passed: bool
    failures: list[str]
    probes: list[dict] = field(default_factory=list)   # per probe: id, max_abs, summaries side by side

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for the console: the numbers and PASS / FAIL with the reasons."""
        m = self.measured
        name = "log-prob" if m.get("quantity") == "log_probs" else "logit"
        parts = [f"max |{name} diff| {m['max_abs']:.3g}" if _finite(m.get("max_abs")) else f"max |{name} diff| n/a"]
        if _finite(m.get("mean_abs")) and m.get("quantity") == "log_probs":
            parts.append(f"mean {m['mean_abs']:.3g}")
        if _finite(m.get("argmax_agreement")):
            parts.append(f"argmax agreement {m['argmax_agreement']:.2%}")
        text = ", ".join(parts) + f" over {m.get('positions', 0)} probe tokens"
        if "summaries_identical" in m:
            text += f"; summaries identical {m['summaries_identical']}/{m['summaries_compared']}"
        return text + (" -> PASS" if self.passed else " -> FAIL: " + "; ".join(self.failures))


def report(check: str, key: str, measured: dict, probes: list[dict], rows: list[dict] | None = None,
           agreement: dict | None = None, overrides: dict | None = None, extra_failures=()) -> ParityReport:
    """Judge `measured` (from `compare`) plus the summary agreement (from `side_by_side`) against
    THRESHOLDS[(check, key)]; `extra_failures` are the caller's own findings (warnings, a
    tokenizer that encodes differently, ...)."""
    per_probe = compare_rows(probes, rows, measured.get("per_probe_max_abs"))
    measured = {k: v for k, v in measured.items() if k != "per_probe_max_abs"}
    if agreement is not None:
        measured.update(summaries_identical=agreement["identical"], summaries_compared=agreement["of"],
                        identical_summaries=agreement["identical"] / agreement["of"] if agreement["of"] else None,
                        **{k: v for k, v in agreement.items() if k.startswith("rougeL")})
    thresholds = thresholds_for(check, key, overrides)
    failures = judge(measured, thresholds) + [f for f in extra_failures if f]
    return ParityReport(check, key, measured, thresholds, not failures, failures, per_probe)


def compare_rows(probes: list[dict], rows: list[dict] | None, measured_per_probe: list | None) -> list[dict]:
    """Per probe: its id, the side-by-side summaries when there are any, its own max |diff|."""
    out = []
    for i, probe in enumerate(probes):
        row = dict(rows[i]) if rows and i < len(rows) else {"id": probe["id"]}
        if measured_per_probe is not None and i < len(measured_per_probe):
            row["max_abs"] = measured_per_probe[i]
        out.append(row)
    return out
