"""Model ranking: reference baselines, the composite score, the Pareto front, and the report.

Reference baselines need no model and show what a model must beat:
* lead-k: the first k turns of the dialogue (turns are lines);
* extractive: the k most central turns, in dialogue order. A turn longer than 60 words (AMI
  meetings put a speaker's whole contribution on one line) is split into sentences that keep
  the speaker label. Centrality = sum over the distinct content words of the unit (lower-case,
  3+ letters, not a stop word) of their frequency in the whole dialogue, divided by the square
  root of the unit's content-word count (so long units do not win by length alone).
Both are cut to `max_words` words (0 = no cut), as the models are cut by MAX_NEW_TOKENS.

Composite score (model rows only; baselines and failed models get none), min-max normalised:

    quality = (ROUGE-L - min ROUGE-L) / (max ROUGE-L - min ROUGE-L)
    speed   = (log10 samples/s - min) / (max - min)        # log: a 2x speed-up counts the same anywhere
    composite = (QUALITY_WEIGHT * quality + SPEED_WEIGHT * speed) / (QUALITY_WEIGHT + SPEED_WEIGHT)

over the successful models of the run (a normalised value is 1.0 when all models tie). The
Pareto front holds the models that no other model beats on both ROUGE-L and samples/s.

Measuring a model (measure_model): load, warm up on the shortest dialogues (untimed), then time
one generate pass of the shared engine over all dialogues; samples/s and generated tokens/s come
from that pass only. Peak memory is torch.cuda.max_memory_allocated on a GPU and the peak RSS of
the process on a CPU; run_isolated runs each model in a fresh process so those numbers are the
model's own (imports included on CPU) and an out-of-memory kill becomes an error row.
"""
from __future__ import annotations

import base64
import html
import json
import math
import re
import threading
import time
from pathlib import Path

from finetuneflow.contract.io import atomic_path, atomic_write_json, atomic_write_text

COLUMNS = ["rank", "model", "kind", "status", "rougeL", "rouge1", "rouge2", "rougeLsum", "bertscore_f1",
           "composite", "quality_norm", "speed_norm", "pareto", "samples_per_s", "tokens_per_s", "seconds",
           "load_seconds", "n_samples", "avg_pred_words", "max_input_length", "truncated_inputs", "generated_tokens",
           "peak_memory_mb", "memory_kind", "parameters", "quantizable_parameters", "family", "model_type", "hidden_size",
           "encoder_layers", "decoder_layers", "vocab_size", "device", "dtype", "entry", "source",
           "predictions", "error"]
STOPWORDS = frozenset("""a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each few for from further get got had
has have having he her here hers herself him himself his how i if in into is it its itself just let me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she should so some
such than that the their theirs them themselves then there these they this those through to too under until up
very was we were what when where which while who whom why will with would you your yours yourself yourselves yes
yeah okay ok oh um uh mm hmm well like gonna wanna really thing things think know just right one two sure""".split())
_SPEAKER = re.compile(r"^\s*([^:\n]{1,40}):\s*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z][A-Za-z']{2,}")


# ----------------------------------------------------------------------------- baselines
def parse_reference(entry: str, lead_k: int, extractive_k: int) -> tuple[str, int] | None:
    """("lead", k) for "lead-3" / "lead-k", ("extractive", k) for "extractive" / "extractive-2"; else None."""
    match = re.fullmatch(r"(lead|extractive)(?:-(\d+|k))?", entry.strip().lower())
    if not match or (match.group(1) == "lead" and match.group(2) is None):
        return None
    k = match.group(2)
    default = lead_k if match.group(1) == "lead" else extractive_k
    return match.group(1), int(k) if k and k.isdigit() else default


def split_turns(dialogue: str) -> list[str]:
    return [line.strip() for line in dialogue.split("\n") if line.strip()]


def cut_words(text: str, max_words: int) -> str:
    """The first `max_words` words, line breaks kept (0 = all)."""
    if not max_words:
        return text
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text if len(ends) <= max_words else text[:ends[max_words - 1]]


def lead_summary(dialogue: str, k: int, max_words: int = 0) -> str:
    return cut_words("\n".join(split_turns(dialogue)[:k]), max_words)


def _units(dialogue: str) -> list[str]:
    units = []
    for turn in split_turns(dialogue):
        if len(turn.split()) <= 60:
            units.append(turn)
            continue
        match = _SPEAKER.match(turn)
        speaker, body = (match.group(1) + ": ", turn[match.end():]) if match else ("", turn)
        units += [speaker + s for s in _SENTENCE.split(body) if s.strip()]
    return units


def _content_words(text: str) -> list[str]:
    match = _SPEAKER.match(text)
    body = text[match.end():] if match else text
    return [w for w in (m.group(0).lower().strip("'") for m in _WORD.finditer(body)) if w not in STOPWORDS]


def extractive_summary(dialogue: str, k: int, max_words: int = 0) -> str:
    units = _units(dialogue)
    words = [_content_words(u) for u in units]
    freq: dict[str, int] = {}
    for unit_words in words:
        for w in unit_words:
            freq[w] = freq.get(w, 0) + 1
    scores = [sum(freq[w] for w in set(ws)) / math.sqrt(len(ws)) if ws else 0.0 for ws in words]
    chosen = sorted(sorted(range(len(units)), key=lambda i: -scores[i])[:k])
    return cut_words("\n".join(units[i] for i in chosen), max_words)


def reference_summaries(kind: str, k: int, dialogues: list[str], max_words: int) -> list[str]:
    make = lead_summary if kind == "lead" else extractive_summary
    return [make(d, k, max_words) for d in dialogues]


# ----------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __init__(self, interval: float = 0.02):
        import psutil
        self._process, self._interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


# ----------------------------------------------------------------------------- scoring
def _minmax(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    return [1.0 if high == low else (v - low) / (high - low) for v in values]


def is_candidate(row: dict) -> bool:
    return row.get("kind") == "model" and row.get("status") == "ok" and bool(row.get("samples_per_s"))


def add_composite(rows: list[dict], quality_weight: float, speed_weight: float,
                  quality_key: str = "rougeL", speed_key: str = "samples_per_s") -> None:
    """Set quality_norm, speed_norm, composite and pareto on the candidate rows (formula above)."""
    if quality_weight < 0 or speed_weight < 0 or quality_weight + speed_weight <= 0:
        raise ValueError("QUALITY_WEIGHT and SPEED_WEIGHT must be >= 0 and not both 0")
    candidates = [r for r in rows if is_candidate(r)]
    if not candidates:
        return
    quality = _minmax([float(r[quality_key]) for r in candidates])
    speed = _minmax([math.log10(float(r[speed_key])) for r in candidates])
    for row, q, s in zip(candidates, quality, speed):
        row["quality_norm"], row["speed_norm"] = round(q, 4), round(s, 4)
        row["composite"] = round((quality_weight * q + speed_weight * s) / (quality_weight + speed_weight), 4)
    for row in candidates:
        row["pareto"] = not any(
            o is not row and o[quality_key] >= row[quality_key] and o[speed_key] >= row[speed_key]
            and (o[quality_key] > row[quality_key] or o[speed_key] > row[speed_key]) for o in candidates)


def formula_text(quality_weight: float, speed_weight: float) -> str:
    total = quality_weight + speed_weight
    text = f"{quality_weight:g} x minmax(ROUGE-L) + {speed_weight:g} x minmax(log10 samples/s)"
    return (text if total == 1 else f"({text}) / {total:g}") + ", min-max over the successful models of the run"


def order_rows(rows: list[dict]) -> list[dict]:
    """Models by composite (best first), then reference baselines by ROUGE-L, then failures; rank 1..n for models."""
    models = sorted([r for r in rows if is_candidate(r)], key=lambda r: (-r["composite"], -r["rougeL"]))
    references = sorted([r for r in rows if r.get("kind") == "reference" and r.get("status") == "ok"],
                        key=lambda r: -r["rougeL"])
    failed = [r for r in rows if r not in models and r not in references]
    for i, row in enumerate(models, 1):
        row["rank"] = i
    return models + references + failed


def explain_winner(rows: list[dict], quality_weight: float, speed_weight: float) -> str:
    models = [r for r in rows if is_candidate(r)]
    references = [r for r in rows if r.get("kind") == "reference" and r.get("status") == "ok"]
    if not models:
        return "no model produced results" + ("; only reference baselines ran" if references else "")
    win = models[0]
    best_q = max(models, key=lambda r: r["rougeL"])
    fastest = max(models, key=lambda r: r["samples_per_s"])
    parts = [f"winner: {win['model']} (composite {win['composite']:.3f} = {quality_weight:g} x quality "
             f"{win['quality_norm']:.2f} + {speed_weight:g} x speed {win['speed_norm']:.2f}, normalised)",
             f"ROUGE-L {win['rougeL']:.2f}" + (" (the best)" if best_q is win else
                                              f" (best: {best_q['model']} {best_q['rougeL']:.2f})"),
             f"{win['samples_per_s']:.3g} samples/s" + (" (the fastest)" if fastest is win else
                                                      f" (fastest: {fastest['model']} {fastest['samples_per_s']:.3g})")]
    if references:
        ref = max(references, key=lambda r: r["rougeL"])
        gap = win["rougeL"] - ref["rougeL"]
        parts.append(f"{'beats' if gap > 0 else 'does NOT beat'} the best reference baseline {ref['model']} "
                     f"(ROUGE-L {ref['rougeL']:.2f}): {gap:+.2f}")
    front = [r["model"] for r in models if r.get("pareto")]
    parts.append(f"Pareto front (quality vs speed): {', '.join(front)}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- files
def _cell(value):
    if isinstance(value, float):
        return round(value, 4)
    return "" if value is None else value


def write_tables(rows: list[dict], out_dir: Path, meta: dict) -> dict:
    """final_ranking.csv (one row per entry, COLUMNS order) and final_ranking.json (rows + run facts)."""
    import pandas as pd
    frame = pd.DataFrame([{c: _cell(r.get(c)) for c in COLUMNS} for r in rows], columns=COLUMNS)
    csv_path, json_path = out_dir / "final_ranking.csv", out_dir / "final_ranking.json"
    atomic_write_text(csv_path, frame.to_csv(index=False))
    atomic_write_json(json_path, {**meta, "rows": [{**{c: r.get(c) for c in COLUMNS},
                                                    **{k: v for k, v in r.items() if k not in COLUMNS}} for r in rows]})
    return {"csv": csv_path, "json": json_path}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def rouge_chart(rows: list[dict], path: Path) -> None:
    """Grouped bars of ROUGE-1/2/L/Lsum per successful entry; baselines hatched."""
    plt = _plt()
    done = [r for r in rows if r.get("status") == "ok"]
    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(done) + 2), 4))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        for i, row in enumerate(done):
            ax.bar(i + (j - 1.5) * width, row[key], width, color=f"C{j}", label=key if i == 0 else None,
                   hatch="//" if row["kind"] == "reference" else None, edgecolor="white")
    ax.set_xticks(range(len(done)))
    ax.set_xticklabels([r["model"] + (" (ref)" if r["kind"] == "reference" else "") for r in done],
                       rotation=20, ha="right")
    ax.set_ylabel("F1 x 100")
    ax.set_ylim(0, 1.25 * max([r[k] for r in done for k in keys] + [1.0]))   # room for the legend
    ax.set_title("ROUGE by model (hatched: reference baselines)")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def tradeoff_chart(rows: list[dict], path: Path) -> None:
    """ROUGE-L vs samples/s (log scale) for the models, the Pareto front as a line, baselines as dashed lines."""
    plt = _plt()
    models = [r for r in rows if is_candidate(r)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in models:
        ax.scatter(row["samples_per_s"], row["rougeL"], s=60, color="C3" if row.get("pareto") else "C0", zorder=3)
        ax.annotate(row["model"], (row["samples_per_s"], row["rougeL"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    front = sorted([r for r in models if r.get("pareto")], key=lambda r: r["samples_per_s"])
    if front:
        ax.plot([r["samples_per_s"] for r in front], [r["rougeL"] for r in front], color="C3", lw=1.5, drawstyle="steps-pre",
                label="Pareto front", zorder=2)
    for i, row in enumerate(r for r in rows if r.get("kind") == "reference" and r.get("status") == "ok"):
        ax.axhline(row["rougeL"], ls="--", lw=1, color=f"C{i + 4}", label=f"{row['model']} (no model)")
    if models:
        ax.set_xscale("log")
    ax.set_xlabel("samples/s (log scale)")
    ax.set_ylabel("ROUGE-L")
    ax.set_title("Quality vs throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


HTML_COLUMNS = ["rank", "model", "kind", "rougeL", "rouge1", "rouge2", "rougeLsum", "bertscore_f1", "composite",
                "pareto", "samples_per_s", "tokens_per_s", "avg_pred_words", "peak_memory_mb", "parameters",
                "device", "predictions"]


def write_html(rows: list[dict], path: Path, charts: list[Path], meta: dict, winner: str) -> None:
    """A self-contained page (charts embedded): the winner, the table, failed models, charts, run facts."""
    import pandas as pd
    done = [r for r in rows if r.get("status") == "ok"]
    frame = pd.DataFrame([{c: _cell(r.get(c)) for c in HTML_COLUMNS} for r in done], columns=HTML_COLUMNS)
    frame["parameters"] = [f"{int(p) / 1e6:,.1f}M" if p not in ("", None) else "" for p in frame["parameters"]]
    frame["pareto"] = ["yes" if p is True else "" for p in frame["pareto"]]
    frame["predictions"] = [f'<a href="{html.escape(str(p))}">csv</a>' if p else "" for p in frame["predictions"]]
    frame["model"] = [html.escape(str(m)) for m in frame["model"]]
    table = frame.to_html(index=False, escape=False, na_rep="", float_format=lambda v: f"{v:.4g}",
                          classes="ranking", border=0)
    failed = "".join(f"<tr><td>{html.escape(str(r['model']))}</td><td>{html.escape(str(r.get('entry', '')))}</td>"
                     f"<td>{html.escape(str(r.get('error', '')))}</td></tr>" for r in rows if r.get("status") != "ok")
    failed = (f'<h2>Failed ({sum(r.get("status") != "ok" for r in rows)})</h2><table class="ranking">'
              f"<tr><th>model</th><th>entry</th><th>error</th></tr>{failed}</table>") if failed else ""
    images = "".join(
        f'<figure><img alt="{html.escape(c.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(c.read_bytes()).decode()}"><figcaption>{html.escape(c.name)}</figcaption></figure>'
        for c in charts)
    facts = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v) if isinstance(v, dict) else str(v))}"
                    f"</td></tr>" for k, v in meta.items() if k != "winner")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FineTuneFlow model ranking</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table.ranking {{ border-collapse: collapse; font-size: 12px; }}
table.ranking th, table.ranking td {{ padding: 4px 8px; border-bottom: 1px solid #ddd; text-align: right; }}
table.ranking td:nth-child(2), table.ranking td:nth-child(3) {{ text-align: left; }}
table.facts th {{ text-align: left; padding-right: 1em; }}
figure {{ display: inline-block; margin: 1em 1em 0 0; }} img {{ max-width: 100%; }}
.winner {{ background: #eef7ee; padding: 0.8em; border-left: 4px solid #3a3; }}
</style></head><body>
<h1>Model ranking</h1>
<p class="winner">{html.escape(winner)}</p>
<h2>Ranking</h2>
<div style="overflow-x: auto">{table}</div>
<p>Composite = {html.escape(str(meta.get('composite_formula', '')))}. Reference baselines need no model and
get no composite; they show what a model must beat.</p>
{failed}
<h2>Charts</h2>
{images}
<h2>Run</h2>
<table class="facts">{facts}</table>
</body></html>
"""
    atomic_write_text(path, page)


# ----------------------------------------------------------------------------- running models
def first_line(exc: BaseException) -> str:
    """One line for an error row: a UserError's message as is, anything else with its type."""
    from finetuneflow.contract.errors import UserError
    text = str(exc).strip()
    text = text.splitlines()[0][:300] if text else ""
    return text if isinstance(exc, UserError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


def model_source(entry: str, import_dir: str) -> str:
    """What load_model gets: a folder, a Hub id, or the folder a .gguf file is imported into
    (finetuneflow.ship.gguf_import; an existing import of the same file is reused)."""
    from finetuneflow.contract.errors import UserError
    from finetuneflow.contract.paths import resolve
    path = resolve(entry)
    if entry.lower().endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"GGUF file not found: {path}")
        from finetuneflow.ship.gguf_import import import_gguf   # only needed for .gguf entries
        target = resolve(import_dir) / re.sub(r"[^\w.-]+", "_", path.stem)
        import_gguf(path, target)
        return str(target)
    if path.exists():
        return str(path)
    if entry.startswith(("/", ".", "~")) or entry.count("/") > 1:
        raise UserError(f"model folder not found: {path}")
    return entry


def label_for(entry: str, taken: set) -> str:
    """A short unique name for an entry: the Hub id's or folder's last part, the .gguf file's stem."""
    stem = Path(entry.rstrip("/")).name
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    label, i = stem or entry, 2
    while label in taken:
        label, i = f"{stem}-{i}", i + 1
    taken.add(label)
    return label


def architecture(config, family: str) -> dict:
    """The config facts recommend_finetune.py's memory formula needs when it cannot load the config."""
    seq2seq = family == "seq2seq"
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), None)  # noqa: E731
    return {"model_type": config.model_type, "hidden_size": get("hidden_size", "d_model", "n_embd"),
            "encoder_layers": get("encoder_layers", "num_layers") if seq2seq else 0,
            "decoder_layers": get("decoder_layers", "num_decoder_layers") if seq2seq else get("num_hidden_layers", "n_layer"),
            "vocab_size": get("vocab_size")}


def quantizable(model) -> int:
    """Parameters in Linear layers except the output head: what a 4-bit (QLoRA) load quantises."""
    import torch
    head = model.get_output_embeddings()
    return sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
               for p in m.parameters(recurse=False))


def measure_model(source: str, dialogues: list[str], settings: dict, batch_size: int, max_input_length,
                  instruction: str, warmup: int, load_in_4bit: bool, trust_remote_code: bool,
                  isolated: bool = False) -> dict:
    """Load, warm up on the shortest dialogues (untimed), generate through the shared engine
    (timed), and report speed, peak memory (GPU: max allocated; CPU: peak RSS) and size."""
    import resource
    import torch
    from finetuneflow.engine.generation import GenerationSettings, summarize
    from finetuneflow.model.backends.hf import parameter_count
    from finetuneflow.model.loading import load_model
    if isolated:   # the parent's run_cli quieted these bars; a fresh process must do it again
        import transformers
        transformers.utils.logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        start = time.perf_counter()
        loaded = load_model(source, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
        load_seconds = time.perf_counter() - start
        limit = loaded.max_positions()   # a longer MAX_INPUT_LENGTH than the model has positions would crash it
        max_input_length = min(max_input_length, limit) if max_input_length else limit
        generation = GenerationSettings(**settings)
        if warmup:
            summarize(loaded, sorted(dialogues, key=len)[:warmup], generation, batch_size, max_input_length,
                      instruction, progress=False)
        result = summarize(loaded, dialogues, generation, batch_size, max_input_length, instruction)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "GPU max allocated"
    else:   # in a child of its own, ru_maxrss (KB) is this model's; in-process only the sampled peak is
        peak = max(rss.peak / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if isolated else 0)
        kind = "process peak RSS"
    return {"summaries": result.summaries, "seconds": result.seconds, "generated_tokens": result.generated_tokens,
            "truncated_inputs": sum(result.truncated), "max_input_length": max_input_length,
            "settings": result.settings, "load_seconds": load_seconds,
            "parameters": parameter_count(loaded.model)[1], "quantizable_parameters": quantizable(loaded.model),
            "family": loaded.family,
            **architecture(loaded.model.config, loaded.family),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""),
            "peak_memory_mb": round(peak, 1), "memory_kind": kind}


def run_isolated(*args) -> dict:
    """measure_model in a fresh process: its peak memory is this model's alone, and a crash or an
    out-of-memory kill becomes an error row instead of ending the benchmark."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure_model, *args, isolated=True).result()
        except BrokenProcessPool:
            raise RuntimeError("the model's process died (killed for memory?)") from None


def score_predictions(row: dict, ids: list, dialogues: list[str], refs: list[str], predictions: list[str],
                      pred_dir: Path, bertscore_model: str) -> None:
    """ROUGE and BERTScore (or why not) into `row`, and <model>_predictions.csv in eval_bart_lora.py's columns."""
    import pandas as pd
    from finetuneflow.quality import metrics
    per_sample = metrics.rouge_per_sample(predictions, refs)
    row.update({k: round(v, 4) for k, v in metrics.mean_scores(per_sample).items()})
    bert = metrics.bertscore(predictions, refs, model=bertscore_model or None)
    row["bertscore_f1"] = round(bert.mean, 4) if bert.computed else None
    row["bertscore_note"] = bert.note
    words = [len(p.split()) for p in predictions]
    row["avg_pred_words"] = round(sum(words) / len(words), 1)
    frame = pd.DataFrame({"id": ids, "dialogue": dialogues, "reference": refs, "prediction": predictions,
                          **{k: [s[k] for s in per_sample] for k in metrics.ROUGE_KEYS},
                          **({"bertscore_f1": bert.f1} if bert.computed else {}),
                          "pred_words": words, "ref_words": [len(r.split()) for r in refs]})
    path = pred_dir / (re.sub(r"[^\w.-]+", "_", row["model"]) + "_predictions.csv")
    atomic_write_text(path, frame.to_csv(index=False))
    row["predictions"] = str(path.relative_to(pred_dir.parent))
