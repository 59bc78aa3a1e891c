"""Running a benchmark: every entry of MODELS on the same dialogues, one row each.

An entry is a reference baseline (`lead-3`, `lead-k`, `extractive`, `extractive-2`:
finetuneflow.plan.baselines), a model folder, a Hub id, or a `.gguf` file (imported once into
GGUF_IMPORT_DIR as a model folder). A model that fails (gated, out of memory, unknown
architecture, bad path) becomes a row with its error and the run goes on; `Ctrl-C` stops it.
Rows are then ranked (finetuneflow.plan.scoring) and reported (finetuneflow.plan.ranking_report).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from finetuneflow.contract.data import DataSpec, get_split, load_data, subset
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.io import CSV_QUOTING, atomic_write_text
from finetuneflow.contract.io import atomic_dir
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord, portable
from finetuneflow.contract.safety import check_location
from finetuneflow.contract.settings import FromConfig
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
from finetuneflow.plan import baselines, ranking_report, scoring
from finetuneflow.plan.outputs import BENCHMARK, StageFolder, open_stage_folder
from finetuneflow.plan.scoring import Weights

PREDICTIONS = "predictions"          # sub-folder of OUTPUT_DIR with one CSV per successful entry


@dataclass(frozen=True)
class BenchmarkSettings(FromConfig):
    """The benchmark stage's settings (same names, lower case)."""
    models: list
    split: str = "validation"
    n_samples: int = 200
    shuffle: bool = False
    seed: int = 42
    instruction: str | None = None
    batch_size: int = 8
    max_input_length: int | None = 1024
    warmup_samples: int = 2
    load_in_4bit: bool = False
    trust_remote_code: bool = False
    isolate: bool = True
    lead_k: int = 3
    extractive_k: int = 3
    reference_max_words: int = 100
    bertscore_model: str = "roberta-large"
    quality_weight: float = 0.7
    speed_weight: float = 0.3
    gguf_import_dir: str = "ft_outputs/imported"

    def __post_init__(self):
        Weights(self.quality_weight, self.speed_weight)   # both >= 0, not both 0: one clear error now

    @property
    def every_row(self) -> bool:
        return self.split.strip().lower() == "all"

    @property
    def weights(self) -> Weights:
        return Weights(self.quality_weight, self.speed_weight)


@dataclass(frozen=True)
class Entry:
    """One entry of MODELS, understood before anything slow runs."""
    entry: str                              # as given
    label: str                              # a unique, file-name-safe short name
    reference: tuple[str, int] | None       # ("lead" | "extractive", k) for a baseline
    path: Path | None                       # the local file or folder it names, when it exists

    @property
    def predictions_file(self) -> str:
        return f"{PREDICTIONS}/{self.label}_predictions.csv"


@dataclass(frozen=True)
class Sample:
    """The rows every entry is scored on."""
    ids: list
    dialogues: list
    references: list
    source: str
    split: str                              # as described to the user
    local_files: list


def safe_label(text: str) -> str:
    """A file-name-safe short name: ASCII letters, digits, `.`, `_`, `-`; no leading dot or dash."""
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:80]
    return label or "model"


def label_for(entry: str, taken: set) -> str:
    """A short unique name for an entry: the Hub id's or folder's last part, the .gguf file's stem."""
    stem = Path(entry.strip().rstrip("/")).name
    stem = safe_label(stem[:-5] if stem.lower().endswith(".gguf") else stem or entry)
    label, i = stem, 2
    while label.lower() in taken:
        label, i = f"{stem}-{i}", i + 1
    taken.add(label.lower())
    return label


def parse_entries(settings: BenchmarkSettings) -> list[Entry]:
    """MODELS as entries; an empty list or a malformed baseline is one clear error."""
    models = [str(m).strip() for m in settings.models if str(m).strip()]
    if not models:
        raise UserError("MODELS is empty: list Hub ids, model folders, .gguf files, lead-3 or extractive, "
                        "e.g. --MODELS=facebook/bart-large-cnn,lead-3")
    entries, taken = [], set()
    for model in models:
        reference = baselines.parse_reference(model, settings.lead_k, settings.extractive_k)
        if reference and reference[1] < 1:
            raise UserError(f"MODELS entry {model!r}: a baseline needs at least 1 turn (e.g. lead-3, extractive-2)")
        path = resolve(model) if not reference else None
        entries.append(Entry(model, label_for(model, taken), reference, path if path and path.exists() else None))
    return entries


def data_spec(cfg: dict, settings: BenchmarkSettings) -> DataSpec:
    """The data settings; with SPLIT=all a single file is read whole, in file order (no split made)."""
    if settings.every_row:
        return DataSpec.from_config(cfg, val_fraction=0.0, test_fraction=0.0)
    return DataSpec.from_config(cfg)


def load_sample(spec: DataSpec, settings: BenchmarkSettings) -> Sample:
    """The rows every entry is scored on: SPLIT (or all rows), the first or a seeded N_SAMPLES."""
    try:
        data = load_data(spec)
        rows = subset(get_split(data, settings.split), settings.n_samples, settings.seed, shuffle=settings.shuffle)
    except UnicodeDecodeError as exc:   # datasets reads the bytes and fails only when a row is decoded
        raise UserError(f"{spec.dataset}: not UTF-8 text ({first_line(exc, 120)}); save it as UTF-8") from None
    if len(rows) == 0:
        raise UserError(f"split {settings.split!r} of {spec.dataset} has no rows to score; choose another --split "
                        f"(or --split=all)")
    split = "all rows" if settings.every_row else settings.split + (" (made from a single file)"
                                                                    if data.made_splits else "")
    return Sample(list(rows["id"]), list(rows["dialogue"]), list(rows["summary"]), data.source, split,
                  list(data.local_files))


def import_target(entry: Entry, import_dir: str) -> Path:
    """The model folder a .gguf entry is imported into."""
    return (resolve(import_dir) / safe_label(Path(entry.entry).name[:-5])).resolve()


def model_source(entry: Entry, import_dir: str) -> str:
    """What load_model gets: a folder, a Hub id, or the folder a .gguf file is imported into
    (finetuneflow.ship.gguf_import; an existing import of the same file is reused)."""
    text = entry.entry
    if text.lower().endswith(".gguf"):
        if entry.path is None or not entry.path.is_file():
            raise UserError(f"GGUF file not found: {resolve(text)}")
        from finetuneflow.ship.gguf_import import import_gguf   # only needed for .gguf entries
        target = import_target(entry, import_dir)
        import_gguf(entry.path, target)
        return str(target)
    if entry.path is not None:
        return str(entry.path)
    if text.startswith(("/", ".", "~")) or text.count("/") > 1:
        raise UserError(f"model folder not found: {resolve(text)}")
    return text


def run_reference(entry: Entry, sample: Sample, settings: BenchmarkSettings) -> tuple[dict, list[str]]:
    kind, k = entry.reference
    start = time.perf_counter()
    predictions = baselines.reference_summaries(kind, k, sample.dialogues, settings.reference_max_words)
    seconds = time.perf_counter() - start
    return ({"kind": "reference", "source": f"{kind} baseline, k={k}", "device": "cpu", "seconds": round(seconds, 4),
             "samples_per_s": round(len(predictions) / max(seconds, 1e-9), 1)}, predictions)


def run_model(entry: Entry, sample: Sample, settings: BenchmarkSettings,
              generation: GenerationSettings) -> tuple[dict, list[str]]:
    from finetuneflow.plan.measuring import MeasureRequest, measure_model, run_isolated
    source = model_source(entry, settings.gguf_import_dir)
    request = MeasureRequest(source, tuple(sample.dialogues), generation, settings.batch_size,
                             settings.max_input_length, settings.instruction, settings.warmup_samples,
                             settings.load_in_4bit, settings.trust_remote_code)
    result = run_isolated(request) if settings.isolate else measure_model(request)
    predictions = result.pop("summaries")
    seconds = result["seconds"]
    row = {**result, "kind": "model", "source": portable(source) if resolve(source).exists() else source,
           "samples_per_s": round(len(predictions) / seconds, 4),
           "tokens_per_s": round(result["generated_tokens"] / seconds, 2), "seconds": round(seconds, 3),
           "load_seconds": round(result["load_seconds"], 2)}
    return row, predictions


def score_predictions(row: dict, sample: Sample, predictions: list[str], path: Path, bertscore_model: str) -> None:
    """ROUGE and BERTScore (or why not) into `row`, and the predictions CSV in eval_bart_lora.py's columns."""
    import pandas as pd
    from finetuneflow.quality import metrics
    per_sample = metrics.rouge_per_sample(predictions, sample.references)
    row.update({k: round(v, 4) for k, v in metrics.mean_scores(per_sample).items()})
    bert = metrics.bertscore(predictions, sample.references, model=bertscore_model or None)
    row["bertscore_f1"] = round(bert.mean, 4) if bert.computed else None
    row["bertscore_note"] = bert.note
    words = [len(p.split()) for p in predictions]
    row["avg_pred_words"] = round(sum(words) / len(words), 1)
    frame = pd.DataFrame({"id": sample.ids, "dialogue": sample.dialogues, "reference": sample.references,
                          "prediction": predictions, **{k: [s[k] for s in per_sample] for k in metrics.ROUGE_KEYS},
                          **({"bertscore_f1": bert.f1} if bert.computed else {}),
                          "pred_words": words, "ref_words": [len(r.split()) for r in sample.references]})
    atomic_write_text(path, frame.to_csv(index=False, quoting=CSV_QUOTING))


def run_entry(entry: Entry, sample: Sample, settings: BenchmarkSettings, generation: GenerationSettings,
              pred_dir: Path) -> dict:
    """One row: measured, scored, its predictions written into `pred_dir`; a failure is an error row."""
    row = {"model": entry.label, "entry": entry.entry, "status": "ok", "n_samples": len(sample.dialogues)}
    try:
        if entry.reference:
            measured, predictions = run_reference(entry, sample, settings)
        else:
            measured, predictions = run_model(entry, sample, settings, generation)
        row.update(measured)
        score_predictions(row, sample, predictions, pred_dir / Path(entry.predictions_file).name,
                          settings.bertscore_model)
        row["predictions"] = entry.predictions_file
    except KeyboardInterrupt:
        raise
    except Exception as exc:   # one broken model must not stop the benchmark: record why and go on
        text = first_line(exc, 300)
        if not isinstance(exc, UserError) and text != type(exc).__name__:
            text = f"{type(exc).__name__}: {text}"
        row.update(status="error", error=text)
        row.setdefault("kind", "reference" if entry.reference else "model")
    return row


def run_entries(entries: list[Entry], sample: Sample, settings: BenchmarkSettings, generation: GenerationSettings,
                pred_dir: Path, log: Callable[[str], None] = print) -> list[dict]:
    """Every entry in order (the per-entry loop of the stage)."""
    rows = []
    for i, entry in enumerate(entries, 1):
        log(f"[{i}/{len(entries)}] {entry.entry}")
        row = run_entry(entry, sample, settings, generation, pred_dir)
        rows.append(row)
        if row["status"] != "ok":
            log(f"    failed: {row['error']}")
            continue
        memory = (f", peak {row['peak_memory_mb']:.0f} MB ({row['memory_kind']})"
                  if row["kind"] == "model" else "")
        log(f"    ROUGE-L {row['rougeL']:.2f}, {row['samples_per_s']:.3g} samples/s{memory}")
    return rows


# ----------------------------------------------------------------------------- the run as a whole
def open_output(output_dir: str, entries: list[Entry], spec: DataSpec, settings: BenchmarkSettings,
                overwrite: bool) -> StageFolder:
    """OUTPUT_DIR checked before anything slow (finetuneflow.plan.outputs): not a protected place or
    an input, nobody else's files; an earlier ranking is replaced only with OVERWRITE."""
    inputs = [spec.dataset, settings.bertscore_model, *(e.path for e in entries if e.path)]
    folder = open_stage_folder(output_dir, BENCHMARK, inputs=inputs)
    for entry in entries:   # where .gguf entries will be imported (import_gguf checks the folder itself too)
        if entry.entry.lower().endswith(".gguf") and entry.path is not None:
            target = import_target(entry, settings.gguf_import_dir)
            if ".git" in target.parts:
                raise UserError(f"GGUF_IMPORT_DIR={settings.gguf_import_dir}: {target} is inside a .git folder; "
                                f"choose a folder such as ft_outputs/imported")
            check_location(target, "GGUF_IMPORT_DIR", inputs)
    if folder.previous is not None and not overwrite:
        raise UserError(f"OUTPUT_DIR={folder.path} holds an earlier {BENCHMARK} ranking (written "
                        f"{folder.previous.created or 'earlier'}); pass --OVERWRITE=True to replace it, or choose "
                        f"another OUTPUT_DIR")
    folder.check_files(ranking_report.REPORT_FILES + ([folder.record_name] if folder.previous is None else []))
    folder.check_folder(PREDICTIONS)
    return folder


def rank(rows: list[dict], weights: Weights) -> tuple[list[dict], str]:
    """Composite, order and verdict; every entry failing is an error (nothing is written)."""
    failed = [r for r in rows if r["status"] != "ok"]
    if len(failed) == len(rows):
        raise UserError(f"every entry of MODELS failed (first: {failed[0]['entry']}: {failed[0]['error']}); fix them "
                        f"or add lead-3; nothing was written")
    scoring.add_composite(rows, weights)
    rows = scoring.order_rows(rows)
    return rows, scoring.explain_winner(rows, weights)


def run_facts(rows: list[dict], sample: Sample, settings: BenchmarkSettings, generation: GenerationSettings,
              winner: str) -> dict:
    notes = sorted({r["bertscore_note"] for r in rows if r.get("bertscore_note")})
    return {"dataset": sample.source, "split": sample.split, "n_samples": len(sample.dialogues),
            "generation": {**generation.overrides(), "batch_size": settings.batch_size,
                           "max_input_length": settings.max_input_length},
            "composite_formula": scoring.formula_text(settings.weights),
            "bertscore": "; ".join(notes) or "no successful rows", "winner": winner,
            "failed": sum(r["status"] == "error" for r in rows)}


def run_benchmark(entries: list[Entry], sample: Sample, settings: BenchmarkSettings, generation: GenerationSettings,
                  folder: StageFolder, cfg: dict, log: Callable[[str], None] = print) -> dict:
    """Run every entry, rank, and write the report; the predictions folder and the record are
    replaced only when the run succeeds (an interrupted or all-failed run changes nothing)."""
    created = [p for p in (folder.path, *folder.path.parents) if not p.exists()]   # deepest first
    inputs = [*sample.local_files, *(e.path for e in entries if e.path)]
    try:
        with atomic_dir(folder.path / PREDICTIONS) as pred_dir:
            rows = run_entries(entries, sample, settings, generation, pred_dir, log)
            rows, winner = rank(rows, settings.weights)
            meta = run_facts(rows, sample, settings, generation, winner)
            record = RunRecord(BENCHMARK, instruction=settings.instruction or DEFAULT_INSTRUCTION, extra={
                "dataset": sample.source, "data_split": sample.split, "n_samples": len(sample.dialogues),
                "winner": rows[0]["model"] if scoring.is_candidate(rows[0]) else None,
                "composite_formula": meta["composite_formula"], "bertscore": meta["bertscore"]})
            names = ranking_report.REPORT_FILES + [r["predictions"] for r in rows if r.get("predictions")]
            folder.claim(names, record, cfg, inputs)
            ranking_report.write_report(rows, folder.path, meta, winner)
    except BaseException:
        for path in created:   # new folders that got nothing: leave no trace
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        raise
    removed, kept = folder.finish(names, record, cfg, inputs)
    return {"rows": rows, "winner": winner, "meta": meta, "removed": removed, "kept": kept}
