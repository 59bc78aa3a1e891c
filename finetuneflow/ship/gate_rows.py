"""What the deploy gate compares (ship/deploy_gate.py): the held-out rows and how both sides decode.

* rows: by default the rows of the transformers model's own evaluation
  (`metrics/<tag>_eval.json` + `<tag>_predictions.csv` written by eval_bart_lora.py), found by
  the model it names: the export's source, or the folder it was cleaned from, or the adapter it
  was merged from (merge and cleanup proved those give the same summaries); GATE_EVAL names one.
  `GATE_SAMPLES` caps the rows. Without a usable evaluation: `GATE_SAMPLES` (default
  FALLBACK_ROWS) held-out rows of the data the model was trained on (its record's split; rows it
  was trained on are dropped and counted);
* decoding: the evaluation's (its prompt, input limit, long-input mode and decoding settings),
  else the export's resolved settings; `Decoding.for_runtime` adapts it to what a runtime can run
  (llama.cpp has no beam search).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from finetuneflow.contract.decoding import GenerationSettings, override
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import portable

METRICS_DIR = "metrics"          # where eval_bart_lora.py writes <tag>_eval.json by default
FALLBACK_ROWS = 32               # held-out rows when no evaluation can be reused and GATE_SAMPLES is None
FEW_ROWS = 30                    # below this many rows the interval is wide: said in the report
RELATIONS = ("the export's source model", "the folder it was cleaned from", "the adapter it was merged from")


# ----------------------------------------------------------------------------- what is compared

@dataclass(frozen=True)
class Decoding:
    """How both sides summarize: the prompt, the input limit, long inputs and the decoding."""
    instruction: str | None
    max_input_length: int | None
    long_input: str
    generation: GenerationSettings

    def for_runtime(self, runtime: str) -> tuple["Decoding", str | None]:
        """The same decoding as the artifact's runtime can run it, and why it changed (None: unchanged)."""
        beams = self.generation.num_beams or 1
        if runtime == "llama.cpp" and beams > 1:
            return (replace(self, generation=override(self.generation, {"num_beams": 1})),
                    f"evaluated with num_beams={beams}; llama.cpp (and Ollama) decode greedily, so both sides run "
                    f"greedily here")
        return self, None

    def served(self) -> tuple["Decoding", str | None]:
        """The decoding a chat server runs from the generated Modelfile (greedy, num_predict, stop):
        no MBR, beams, `no_repeat_ngram_size` or `min_new_tokens` (llama-server and Ollama have none), and
        why it differs from this one (None: the same)."""
        g = self.generation
        dropped = {k: v for k, v in (("decoding", "mbr" if g.decoding == "mbr" else None),
                                     ("num_beams", g.num_beams if (g.num_beams or 1) > 1 else None),
                                     ("no_repeat_ngram_size", g.no_repeat_ngram_size or None),
                                     ("min_new_tokens", g.min_new_tokens or None)) if v is not None}
        if not dropped:
            return self, None
        served = replace(self, generation=replace(g.without_mbr(), num_beams=1, no_repeat_ngram_size=None,
                                                  min_new_tokens=None))
        what = ", ".join(f"{k}={v}" for k, v in dropped.items())
        return served, (f"decoded with {what}, which llama-server and Ollama cannot apply: the server's summaries are "
                        f"compared with the in-process backend's decoded as the Modelfile says (greedy, without them)")

    def as_dict(self) -> dict:
        return {"instruction": self.instruction, "max_input_length": self.max_input_length,
                "long_input": self.long_input, **self.generation.as_dict()}


@dataclass
class EvalSide:
    """A finished evaluation of the transformers model whose rows and predictions the gate reuses."""
    eval_json: Path
    predictions: Path
    record: dict
    rows: list[dict]                 # id, dialogue, summary (reference), prediction
    decoding: Decoding
    relation: str                    # how its model relates to the export's source

    @property
    def model(self) -> str:
        return str(self.record.get("model", {}).get("name"))


@dataclass
class GateInput:
    rows: list[dict]                 # id, dialogue, summary
    description: str
    decoding: Decoding
    evaluation: EvalSide | None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- finding the evaluation

def _same_path(name: str | None, other: str | Path | None) -> bool:
    if not name or not other:
        return False
    a, b = resolve(name), resolve(other)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def relation_to(source, record: dict) -> str | None:
    """How the evaluated model relates to the export's source (None: another model)."""
    model = record.get("model") or {}
    if not isinstance(model, dict) or model.get("backend", "transformers") != "transformers":
        return None
    lineage = source.record.lineage
    for relation, path in zip(RELATIONS, (source.path, lineage.cleaned_from, lineage.merged_from)):
        if _same_path(model.get("name"), path):
            return relation
    return None


def _eval_candidates(gate_eval: str | None) -> tuple[list[Path], bool]:
    """The eval json files to consider, and whether the user named them."""
    if gate_eval is None:
        folder = resolve(METRICS_DIR)
        return (sorted(folder.glob("*_eval.json"), key=lambda p: -p.stat().st_mtime) if folder.is_dir() else []), False
    path = resolve(gate_eval)
    if path.is_dir():
        found = sorted(path.glob("*_eval.json"), key=lambda p: -p.stat().st_mtime)
        if not found:
            raise UserError(f"GATE_EVAL={gate_eval} holds no <tag>_eval.json; pass the folder eval_bart_lora.py "
                            f"wrote (OUTPUT_DIR, default metrics) or one of its files")
        return found, True
    if path.name.endswith("_predictions.csv"):
        path = path.with_name(path.name[:-len("_predictions.csv")] + "_eval.json")
    elif path.is_file() and not path.name.endswith("_eval.json"):
        raise UserError(f"GATE_EVAL={gate_eval} is not an evaluation: pass a <tag>_eval.json (or its "
                        f"<tag>_predictions.csv) written by eval_bart_lora.py, or a folder of them")
    if not path.is_file():
        raise UserError(f"GATE_EVAL={gate_eval}: {path} does not exist; pass a <tag>_eval.json (or its "
                        f"<tag>_predictions.csv) written by eval_bart_lora.py, or leave GATE_EVAL unset")
    return [path], True


def read_evaluation(path: Path, relation: str) -> EvalSide:
    """One evaluation and its predictions, or one line saying why it cannot be reused."""
    from finetuneflow.quality.predictions import eval_record_for, read_predictions
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a readable evaluation record ({type(exc).__name__})") from None
    predictions = path.with_name(path.name[:-len("_eval.json")] + "_predictions.csv")
    if not isinstance(record, dict) or "generation" not in record or not predictions.is_file():
        raise UserError(f"{path} is not an eval_bart_lora.py record with its {predictions.name} beside it")
    if eval_record_for(predictions) is None:
        raise UserError(f"{predictions.name} changed after {path.name} was written (its sha256 differs)")
    preds = read_predictions(predictions)
    if not preds.has_dialogue:
        raise UserError(f"{predictions.name} has no dialogue column to summarize again")
    if len(preds.frame) != record.get("samples"):
        raise UserError(f"{predictions.name} reads back as {len(preds.frame)} rows, but {path.name} scored "
                        f"{record.get('samples')}: the CSV does not read back as it was written")
    rows = [{"id": str(r.id), "dialogue": r.dialogue, "summary": r.reference, "prediction": r.prediction}
            for r in preds.frame.itertuples()]
    generation = record["generation"]
    decoding = Decoding(generation.get("instruction"), generation.get("max_input_length"),
                        generation.get("long_input") or "truncate", GenerationSettings.from_record(generation))
    return EvalSide(path, predictions, record, rows, decoding, relation)


def find_evaluation(source, gate_eval: str | None) -> tuple[EvalSide | None, list[str]]:
    """The evaluation to reuse (the nearest relation first, then the newest), and notes on those
    passed over. An evaluation named by GATE_EVAL must be usable."""
    candidates, named = _eval_candidates(gate_eval)
    found, notes = [], []
    for path in candidates:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            record = None
        relation = relation_to(source, record) if isinstance(record, dict) else None
        if relation is None and named:
            relation = "named by GATE_EVAL"
        if relation is None:
            continue
        try:
            found.append(read_evaluation(path, relation))
        except UserError as exc:
            if named:
                raise UserError(f"GATE_EVAL: {exc}") from None
            notes.append(f"{portable(path)} not reused: {exc}")
    order = {relation: i for i, relation in enumerate(RELATIONS)}
    found.sort(key=lambda e: order.get(e.relation, len(RELATIONS)))
    return (found[0] if found else None), notes


# ----------------------------------------------------------------------------- the rows

def _dataset_path(source: str) -> str | None:
    """The training data a record names, as load_dialogues takes it (a relative path may be one
    under the code folder: the bundled samples), or None when it is not here and not a Hub id."""
    from finetuneflow.contract.paths import CODE_ROOT, is_hub_id
    if resolve(source).exists():
        return str(resolve(source))
    if not Path(source).is_absolute() and (CODE_ROOT / source).exists():
        return str(CODE_ROOT / source)
    return source if is_hub_id(source) else None


def _split_rows(split, dataset: str, n: int, seed: int, names: tuple[str, ...] = ("test", "validation")
                ) -> tuple[list[dict], str]:
    """`n` rows of the first non-empty split of `names` (default: test, else validation) of the
    model's training data, as it was split."""
    from finetuneflow.contract.data import load_dialogues, subset
    columns = split.columns or {}
    data = load_dialogues(dataset, columns.get("dialogue"), columns.get("summary"), columns.get("id"),
                          split.seed if split.seed is not None else 42, split.val_fraction or 0.1,
                          split.test_fraction or 0.1, bool(split.normalize), split.hub_config)
    name = next((s for s in names if len(data.splits.get(s, ())) > 0), None)
    if name is None:
        raise UserError(f"{split.source} has no {' or '.join(names)} rows")
    rows = [{"id": str(r["id"]), "dialogue": r["dialogue"], "summary": r["summary"]}
            for r in subset(data.splits[name], n, seed)]
    return rows, f"the {name} split of {portable(split.source)}"


def held_out_rows(source, n: int, probe_dataset: str, probe_split: str, seed: int) -> tuple[list[dict], str, list[str]]:
    """`n` rows the model was not trained on: the test (else validation) split of the data its
    record names; when that data is not here, the probe dataset's split. Rows the record lists as
    training rows are dropped and counted."""
    from finetuneflow.contract.data import training_overlap
    from finetuneflow.ship.parity import load_probes
    split, notes = source.record.split, []
    dataset = _dataset_path(split.source) if split is not None and split.source else None
    rows = None
    if dataset is not None:
        try:
            rows, where = _split_rows(split, dataset, n, seed)
        except UserError as exc:
            notes.append(f"the model's training data could not be read for held-out rows ({exc})")
    elif split is not None and split.source:
        notes.append(f"the model's training data {split.source} is not here")
    if rows is None:
        rows, probes = load_probes(probe_dataset, n, probe_split, seed)
        where = f"split {probe_split!r} of {portable(probes)}" + \
            ("" if split is not None and split.source else " (the model's record names no training data)")
    trained = set(training_overlap(rows, split) or [])
    if trained:
        notes.append(f"{len(trained)} of the {len(rows)} rows were training rows and were dropped")
        rows = [r for r in rows if r["id"] not in trained]
    if not rows:
        raise UserError(f"every row the deploy gate took from {where} was a training row of the model; pass "
                        f"--GATE_EVAL=<an evaluation of the model> or --GATE=off")
    return rows, f"{len(rows)} held-out rows of {where}", notes


def training_rows(source, n: int, seed: int) -> tuple[list[dict] | None, dict, list[str]]:
    """`n` rows of the training split of the data the model's record names (its lineage), where
    they came from ({file, split, count}), and notes; (None, {}, notes) when that data is not here."""
    split = source.record.split
    if split is None or not split.source:
        return None, {}, ["the model's record names no training data"]
    dataset = _dataset_path(split.source)
    if dataset is None:
        return None, {}, [f"the model's training data {split.source} is not here"]
    try:
        rows, where = _split_rows(split, dataset, n, seed, names=("train",))
    except UserError as exc:
        return None, {}, [f"the model's training data could not be read ({exc})"]
    return rows, {"file": portable(split.source), "split": "train", "count": len(rows)}, []


def gate_input(source, settings, resolved) -> GateInput:
    """The rows, how both sides decode, and the evaluation to reuse (before anything slow runs)."""
    evaluation, notes = find_evaluation(source, settings.gate_eval)
    cap = settings.gate_samples
    if evaluation is not None:
        rows = evaluation.rows[:cap] if cap else evaluation.rows
        if cap and cap > len(evaluation.rows):
            notes.append(f"GATE_SAMPLES={cap}, but the evaluation has {len(evaluation.rows)} rows: all are used")
        what = f"{len(rows)} rows of {portable(evaluation.predictions)} (the evaluation of " \
               f"{evaluation.model}, {evaluation.relation})"
        decoding = evaluation.decoding
        rows = [{k: r[k] for k in ("id", "dialogue", "summary")} for r in rows]
    else:
        rows, what, more = held_out_rows(source, cap or FALLBACK_ROWS, settings.probe_dataset, settings.probe_split,
                                         settings.seed)
        notes += more + [f"no {'usable ' if notes else ''}evaluation of this model in {METRICS_DIR}/ (run "
                         f"eval_bart_lora.py on it first to gate on its rows): the transformers model runs too"]
        decoding = Decoding(resolved.instruction, resolved.max_input_length, "truncate",
                            GenerationSettings.from_record(resolved.generation))
    if len(rows) < FEW_ROWS:
        notes.append(f"only {len(rows)} rows: the intervals are wide, so only a large ROUGE-L loss can hold an "
                     f"artifact, and the rate criteria (non-inferiority within a margin) pass only where the rates "
                     f"hardly change")
    return GateInput(rows, what, decoding, evaluation, notes)
