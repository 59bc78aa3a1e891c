"""The deploy gate: does the file a user ships summarize as well as the model they evaluated?

The parity checks (ship/parity.py) prove an export computes nearly the same numbers on a few
probes; the gate measures the task. After the export is converted and verified, and before
anything is written, every artifact (each GGUF type through llama.cpp, a CTranslate2 folder
through CTranslate2) summarizes the same held-out rows the transformers model was evaluated on,
and each is judged against that model:

* rows: by default the rows of the transformers model's own evaluation
  (`metrics/<tag>_eval.json` + `<tag>_predictions.csv` written by eval_bart_lora.py), found by
  the model it names: the export's source, or the folder it was cleaned from, or the adapter it
  was merged from (merge and cleanup proved those give the same summaries). Its predictions are
  the transformers side when the artifact's runtime decodes with the same settings (llama.cpp
  has no beam search: an evaluation with beams is re-run greedily on both sides).
  `GATE_SAMPLES` caps the rows. Without a usable evaluation: `GATE_SAMPLES` (default
  FALLBACK_ROWS) held-out rows of the data the model was trained on (its record's split; rows it
  was trained on are dropped and counted), and the transformers model runs too;
* per artifact: file size, samples/s, ROUGE-1/2/L, the ROUGE-L difference to the transformers
  model with a paired bootstrap 95% interval (quality/metrics.paired_bootstrap over the same
  rows), the share of identical summaries, and a verdict: **ship** when the loss is not
  significant (the interval's upper bound is >= 0), else **hold**;
* the smallest artifact that ships is named; the report is `deploy_report.json` plus a
  self-contained `deploy_report.html` (`deploy_section(report)` gives the same section for
  another HTML report), and the table is printed.

A hold is a finding, not an error, unless REQUIRE_SHIP=True: then the export writes nothing.
"""
from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import ids_digest, portable, sha256_file

GATE_MODES = ("on", "off")
METRICS_DIR = "metrics"          # where eval_bart_lora.py writes <tag>_eval.json by default
FALLBACK_ROWS = 32               # held-out rows when no evaluation can be reused and GATE_SAMPLES is None
FEW_ROWS = 30                    # below this many rows the interval is wide: said in the report
CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 1000
RULE = ("ship when the 95% paired-bootstrap interval of ROUGE-L(artifact) - ROUGE-L(transformers) over the same "
        "rows has an upper bound >= 0 (the artifact is not significantly worse); otherwise hold")
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
            return (replace(self, generation=replace(self.generation, num_beams=1)),
                    f"evaluated with num_beams={beams}; llama.cpp (and Ollama) decode greedily, so both sides run "
                    f"greedily here")
        return self, None

    def as_dict(self) -> dict:
        return {"instruction": self.instruction, "max_input_length": self.max_input_length,
                "long_input": self.long_input, **self.generation.as_dict()}


@dataclass
class Artifact:
    label: str                       # the output type: q8_0, q4_k_m, int8, ...
    path: Path                       # what loads now (the converted, not yet published, copy)
    final: Path                      # where it is published
    runtime: str                     # llama.cpp | ctranslate2
    skipped: str | None = None       # why it cannot run here (it is reported, never judged)

    @property
    def bytes(self) -> int:
        return _size(self.path)


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


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


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


def _split_rows(split, dataset: str, n: int, seed: int) -> tuple[list[dict], str]:
    """`n` rows of the test (else validation) split of the model's training data, as it was split."""
    from finetuneflow.contract.data import load_dialogues, subset
    columns = split.columns or {}
    data = load_dialogues(dataset, columns.get("dialogue"), columns.get("summary"), columns.get("id"),
                          split.seed if split.seed is not None else 42, split.val_fraction or 0.1,
                          split.test_fraction or 0.1, bool(split.normalize), split.hub_config)
    name = next((s for s in ("test", "validation") if len(data.splits.get(s, ())) > 0), None)
    if name is None:
        raise UserError(f"{split.source} has no test or validation rows")
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
        notes.append(f"only {len(rows)} rows: the intervals are wide, so only a large loss can hold an artifact")
    return GateInput(rows, what, decoding, evaluation, notes)


# ----------------------------------------------------------------------------- running and judging

@dataclass
class Side:
    summaries: list[str]
    timing: dict
    how: str
    decoding: dict


def run_side(loaded, rows: list[dict], decoding: Decoding, batch_size: int, how: str) -> Side:
    """Summaries of the rows through the engine, after one warm-up batch (first-call allocations
    and a runtime's context creation are not throughput)."""
    from finetuneflow.engine.long_input import summarize_long
    dialogues, ids = [r["dialogue"] for r in rows], [r["id"] for r in rows]
    summarize_long(loaded, dialogues[:batch_size], decoding.generation, batch_size, decoding.max_input_length,
                   decoding.instruction or "", decoding.long_input, progress=False)   # warm-up: the first batch
    result = summarize_long(loaded, dialogues, decoding.generation, batch_size, decoding.max_input_length,
                            decoding.instruction or "", decoding.long_input, progress=False, ids=ids)
    return Side(result.summaries, result.timing(), how, {**decoding.as_dict(), "backend": loaded.backend.name})


def scores_of(summaries: list[str], rows: list[dict]) -> list[dict]:
    from finetuneflow.quality.metrics import rouge_per_sample
    return rouge_per_sample(summaries, [r["summary"] for r in rows])


def _means(scores: list[dict]) -> dict:
    return {k: round(sum(s[k] for s in scores) / len(scores), 4) for k in ("rouge1", "rouge2", "rougeL")}


def judge(reference: list[dict], scores: list[dict], reference_summaries: list[str], summaries: list[str]) -> dict:
    """ΔROUGE-L with its paired-bootstrap interval, identical summaries, and the verdict."""
    from finetuneflow.quality.metrics import paired_bootstrap
    paired = paired_bootstrap([s["rougeL"] for s in reference], [s["rougeL"] for s in scores], BOOTSTRAP_SAMPLES,
                              CONFIDENCE)
    identical = sum(a == b for a, b in zip(reference_summaries, summaries))
    return {"delta_rougeL": {"mean": round(paired.difference, 4), "low": round(paired.low, 4),
                             "high": round(paired.high, 4), "p_value": round(paired.p_value, 4),
                             "confidence": CONFIDENCE, "bootstrap_samples": BOOTSTRAP_SAMPLES},
            "identical": identical, "identical_share": round(identical / len(summaries), 4) if summaries else None,
            "verdict": "ship" if paired.high >= 0 else "hold"}


def smallest_shipping(rows: list[dict]) -> dict | None:
    shipping = [r for r in rows if r.get("verdict") == "ship"]
    return min(shipping, key=lambda r: r["bytes"]) if shipping else None


class DeployGate:
    """One gate over the artifacts of one export (see the module docstring)."""

    def __init__(self, source, settings, resolved, log=print):
        self.source, self.settings, self.resolved, self.log = source, settings, resolved, log
        self.input = gate_input(source, settings, resolved)
        self._references: dict[Decoding, Side] = {}

    def reference(self, decoding: Decoding) -> Side:
        """The transformers side for `decoding`: the evaluation's predictions when they were made
        with it, else the source model run now (once per decoding)."""
        if decoding in self._references:
            return self._references[decoding]
        evaluation = self.input.evaluation
        if evaluation is not None and decoding == evaluation.decoding:
            rows = evaluation.rows[:len(self.input.rows)]
            side = Side([r["prediction"] for r in rows], evaluation.record.get("timing", {}),
                        f"the predictions in {portable(evaluation.predictions)} (speed as eval_bart_lora.py measured "
                        f"it on {evaluation.record.get('device', '?')})",
                        {**decoding.as_dict(), "backend": "transformers"})
        else:
            self.log(f"deploy gate: summarizing {len(self.input.rows)} rows with the transformers model")
            side = run_side(self.source.reference_model(), self.input.rows, decoding, self.settings.batch_size,
                            f"{portable(self.source.path)} run now with the same decoding as the artifacts")
        self._references[decoding] = side
        return side

    def artifact_row(self, artifact: Artifact) -> dict:
        from finetuneflow.model.loading import load_model
        row = {"label": artifact.label, "file": portable(artifact.final), "runtime": artifact.runtime,
               "bytes": artifact.bytes}
        if artifact.skipped:
            return {**row, "verdict": "not run", "why": artifact.skipped}
        decoding, note = self.input.decoding.for_runtime(artifact.runtime)
        reference = self.reference(decoding)
        self.log(f"deploy gate: {artifact.final.name} ({artifact.runtime}) summarizes {len(self.input.rows)} rows")
        loaded = load_model(str(artifact.path))
        try:
            side = run_side(loaded, self.input.rows, decoding, self.settings.batch_size, "run now")
        finally:
            close = getattr(loaded.model, "close", None)
            if artifact.runtime == "llama.cpp" and close is not None:
                close()
        ref_scores, scores = scores_of(reference.summaries, self.input.rows), scores_of(side.summaries, self.input.rows)
        row.update(samples_per_s=side.timing.get("samples_per_s"), timing=side.timing, **_means(scores),
                   **judge(ref_scores, scores, reference.summaries, side.summaries),
                   transformers={"how": reference.how, "samples_per_s": reference.timing.get("samples_per_s"),
                                 **_means(ref_scores)},
                   decoding=side.decoding, decoding_note=note,
                   summaries=[{"id": r["id"], "summary": s, "rougeL": round(x["rougeL"], 2)}
                              for r, s, x in zip(self.input.rows, side.summaries, scores)])
        return row

    def run(self, artifacts: list[Artifact]) -> dict:
        started = time.perf_counter()
        rows = [self.artifact_row(a) for a in artifacts]
        judged = [r for r in rows if "transformers" in r]
        reference = dict(judged[0]["transformers"]) if judged else {}
        reference.update(label="transformers", file=portable(self.source.path), runtime="transformers",
                         bytes=weights_bytes(self.source.path))
        best = smallest_shipping(rows)
        report = {"stage": "export_gguf", "gate": "deploy", "model": portable(self.source.path),
                  "rows": {"count": len(self.input.rows), "from": self.input.description,
                           "ids_sha256": ids_digest(r["id"] for r in self.input.rows)},
                  "decoding": self.input.decoding.as_dict(), "rule": RULE, "reference": reference,
                  "artifacts": rows, "smallest_shipping": best["file"] if best else None,
                  "notes": self.input.notes + [f"{r['label']}: {r['decoding_note']}" for r in rows
                                               if r.get("decoding_note")],
                  "seconds": round(time.perf_counter() - started, 1)}
        for line in console_lines(report):
            self.log(line)
        return report

    def require_ship(self, report: dict) -> None:
        """REQUIRE_SHIP=True: every artifact must ship, or nothing is written."""
        held = [r for r in report["artifacts"] if r["verdict"] != "ship"]
        if held:
            def why(r):
                if r["verdict"] == "not run":
                    return f"{r['label']} was not run ({r['why']})"
                d = r["delta_rougeL"]
                return f"{r['label']} holds (ROUGE-L {d['mean']:+.2f}, 95% CI [{d['low']:+.2f}, {d['high']:+.2f}])"
            raise UserError(f"deploy gate: {'; '.join(why(r) for r in held)} on {report['rows']['count']} rows; "
                            f"nothing was written (REQUIRE_SHIP=True: every artifact must ship; drop that type or "
                            f"pass --REQUIRE_SHIP=False to write it with its verdict)")


def artifact_hashes(report: dict, artifacts: list[Artifact]) -> None:
    """sha256 of each artifact as written (so a reader can tell the report from a later export)."""
    by_label = {a.label: a for a in artifacts}
    for row in report["artifacts"]:
        artifact = by_label.get(row["label"])
        if artifact is not None and artifact.path.is_file():
            row["sha256"] = sha256_file(artifact.path)


# ----------------------------------------------------------------------------- the table and the HTML

def _mb(n) -> str:
    return f"{n / 1e6:.1f}" if isinstance(n, (int, float)) else "-"


def _num(x, fmt="{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def table_rows(report: dict) -> list[list[str]]:
    """The table both the console and the HTML show: the transformers model, then each artifact."""
    ref = report.get("reference") or {}
    out = [["artifact", "runtime", "size MB", "samples/s", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ΔROUGE-L [95% CI]",
            "identical", "verdict"],
           [f"{Path(str(ref.get('file', 'model'))).name} (source)", "transformers", _mb(ref.get("bytes")),
            _num(ref.get("samples_per_s"), "{:.3g}"), _num(ref.get("rouge1")), _num(ref.get("rouge2")),
            _num(ref.get("rougeL")), "reference", "-", "-"]]
    for r in report.get("artifacts", []):
        if r["verdict"] == "not run":
            out.append([Path(r["file"]).name, r["runtime"], _mb(r["bytes"]), "-", "-", "-", "-", "-", "-",
                        "not run"])
            continue
        d = r["delta_rougeL"]
        out.append([Path(r["file"]).name, r["runtime"], _mb(r["bytes"]), _num(r.get("samples_per_s"), "{:.3g}"),
                    _num(r["rouge1"]), _num(r["rouge2"]), _num(r["rougeL"]),
                    f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]", f"{r['identical_share']:.0%}",
                    r["verdict"]])
    return out


def console_lines(report: dict) -> list[str]:
    rows = table_rows(report)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [f"deploy gate on {report['rows']['from']}:"]
    lines += ["  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                                enumerate(zip(row, widths))) for row in rows]
    lines.append("  " + summary_line(report))
    lines += [f"  note: {n}" for n in report.get("notes", [])]
    for r in report.get("artifacts", []):
        if r["verdict"] == "not run":
            lines.append(f"  {r['label']} not run: {r['why']}")
    return lines


def summary_line(report: dict) -> str:
    best = report.get("smallest_shipping")
    if best:
        row = next(r for r in report["artifacts"] if r["file"] == best)
        return f"smallest artifact that ships: {best} ({_mb(row['bytes'])} MB)"
    judged = [r for r in report.get("artifacts", []) if r["verdict"] != "not run"]
    return "no artifact ships: each is significantly worse than the evaluated model" if judged else \
        "no artifact could be run here"


_STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
          "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}"
          "td:first-child,th:first-child{text-align:left}.ship{background:#d8f5d0}.hold{background:#f8d0d0}"
          ".notrun{background:#eee}pre{white-space:pre-wrap;margin:0;text-align:left;font-size:90%}")


def deploy_section(report: dict) -> list[str]:
    """The deploy gate as an HTML section (a list of lines) for metrics/report.html or deploy_report.html."""
    e = html.escape
    rows = table_rows(report)
    out = ["<h2>Deploy gate: the exported files against the evaluated model</h2>",
           f"<p>{e(str(report['rows']['count']))} rows: {e(report['rows']['from'])}. Rule: {e(report['rule'])}.</p>",
           "<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in rows[0]) + "</tr>"]
    for row in rows[1:]:
        css = {"ship": "ship", "hold": "hold", "not run": "notrun"}.get(row[-1], "")
        out.append(f"<tr class='{css}'>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
    out += ["</table>", f"<p><b>{e(summary_line(report))}</b></p>"]
    decoding = ", ".join(f"{k} {v}" for k, v in report.get("decoding", {}).items()
                         if v is not None and k != "instruction")
    out.append(f"<p>Decoding: {e(decoding)}; the transformers side: "
               f"{e(str((report.get('reference') or {}).get('how', '-')))}.</p>")
    if report.get("notes"):
        out += ["<ul>"] + [f"<li>{e(n)}</li>" for n in report["notes"]] + ["</ul>"]
    out += _audit_html(report) + _examples_html(report)
    return out


def _audit_html(report: dict) -> list[str]:
    e = html.escape
    audits = {k: v for k, v in (report.get("audit") or {}).items() if v.get("side_by_side")}
    if not audits:
        return []
    label, audit = next(iter(audits.items()))
    side = audit["side_by_side"]
    return ["<h3>The prompt each runtime sends (prompt and token audit)</h3>",
            f"<p>{e(label)}: {e(audit.get('summary', ''))}</p>",
            "<table><tr><th>the project's prompt (transformers)</th><th>the Ollama Modelfile's prompt</th></tr>",
            f"<tr><td><pre>{e(side['project_prompt'])}</pre></td><td><pre>{e(side['ollama_prompt'])}</pre></td></tr>",
            "</table>", f"<p>Modelfile: {e(str(audit.get('modelfile', '')))}</p>"]


def _examples_html(report: dict, k: int = 5) -> list[str]:
    """Rows where an artifact's summary differs from the others (the first k)."""
    e = html.escape
    judged = [r for r in report.get("artifacts", []) if r.get("summaries")]
    if not judged:
        return []
    columns = [(r["label"], {s["id"]: s["summary"] for s in r["summaries"]}) for r in judged]
    ids = [s["id"] for s in judged[0]["summaries"]]
    differing = [i for i in ids if len({c[1].get(i) for c in columns}) > 1][:k] or ids[:min(k, 2)]
    out = ["<h3>Examples</h3>", "<table><tr><th>id</th>" + "".join(f"<th>{e(c[0])}</th>" for c in columns) + "</tr>"]
    out += [f"<tr><td>{e(i)}</td>" + "".join(f"<td><pre>{e(c[1].get(i, ''))}</pre></td>" for c in columns) + "</tr>"
            for i in differing]
    return out + ["</table>"]


def deploy_html(report: dict) -> str:
    """A self-contained page (no external files) with the deploy section."""
    title = f"Deploy gate: {html.escape(str(report.get('model')))}"
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>",
                      f"<style>{_STYLE}</style></head><body>", *deploy_section(report), "</body></html>"]) + "\n"
