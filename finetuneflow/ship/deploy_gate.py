"""The deploy gate: does the file a user ships summarize as well as the model they evaluated?

The parity checks (ship/parity.py) prove an export computes nearly the same numbers on a few
probes; the gate measures the task. After the export is converted and verified, and before
anything is written, every artifact (each GGUF type through llama.cpp, a CTranslate2 folder
through CTranslate2) summarizes the same held-out rows the transformers model was evaluated on,
and each is judged against that model:

* rows (ship/gate_rows.py): by default the rows of the transformers model's own evaluation, else
  held-out rows of the data it was trained on. The evaluation's predictions are the transformers
  side when the artifact's runtime decodes with the same settings (llama.cpp has no beam search:
  an evaluation with beams is re-run greedily on both sides); otherwise the transformers model
  runs too. An evaluation with DECODING=mbr is gated with MBR on both sides (the same seed, the
  same choice: quality/mbr.py), the decoding the server will use;
* per artifact: file size, samples/s, and the verdict against the transformers model
  (ship/gate_verdict.py: ROUGE-L difference with a paired bootstrap interval, identical
  summaries, **ship** or **hold**);
* the smallest artifact that ships is named; the report is `deploy_report.json` plus a
  self-contained `deploy_report.html` (ship/gate_report.py), and the table is printed.

This module runs the gate: each artifact loaded, summarizing, judged, and the report assembled.

A hold is a finding, not an error, unless REQUIRE_SHIP=True: then the export writes nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.record import ids_digest, portable, sha256_file
from finetuneflow.ship.gate_report import console_lines
from finetuneflow.ship.gate_rows import Decoding, gate_input
from finetuneflow.ship.gate_rows import held_out_rows as held_out_rows
from finetuneflow.ship.gate_verdict import RULE, hold_reason, judge, means, scores_of, smallest_shipping

GATE_MODES = ("on", "off")


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


def _size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


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
    from finetuneflow.quality.mbr import choose_rows
    summarize_long(loaded, dialogues[:batch_size], decoding.generation, batch_size, decoding.max_input_length,
                   decoding.instruction or "", decoding.long_input, progress=False,
                   chooser=choose_rows)   # warm-up: the first batch
    result = summarize_long(loaded, dialogues, decoding.generation, batch_size, decoding.max_input_length,
                            decoding.instruction or "", decoding.long_input, progress=False, ids=ids,
                            chooser=choose_rows)
    return Side(result.summaries, result.timing(), how, {**decoding.as_dict(), "backend": loaded.backend.name})


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
        row.update(samples_per_s=side.timing.get("samples_per_s"), timing=side.timing, **means(scores),
                   **judge(ref_scores, scores, reference.summaries, side.summaries),
                   transformers={"how": reference.how, "samples_per_s": reference.timing.get("samples_per_s"),
                                 **means(ref_scores)},
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
            reasons = "; ".join(hold_reason(r) for r in held)
            raise UserError(f"deploy gate: {reasons} on {report['rows']['count']} rows; "
                            f"nothing was written (REQUIRE_SHIP=True: every artifact must ship; drop that type or "
                            f"pass --REQUIRE_SHIP=False to write it with its verdict)")


def artifact_hashes(report: dict, artifacts: list[Artifact]) -> None:
    """sha256 of each artifact as written (so a reader can tell the report from a later export)."""
    by_label = {a.label: a for a in artifacts}
    for row in report["artifacts"]:
        artifact = by_label.get(row["label"])
        if artifact is not None and artifact.path.is_file():
            row["sha256"] = sha256_file(artifact.path)


