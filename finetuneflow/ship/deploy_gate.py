"""The deploy gate: does the file a user ships summarize as well as the model they evaluated, in
the runtime and the server they run it in?

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
* the in-process run (ship/gate_run.py): summaries, samples/s, finish reasons, unsupported mentions;
* the server (ship/gate_server.py, GGUF): llama.cpp's own `llama-server` on the same file, with the
  GGUF's chat template and the Modelfile's parameters, summarizes the same rows; its texts must
  equal the in-process ones beyond batch-order noise (SERVER=off, or no llama-server: skipped, one line);
* the verdict (ship/gate_verdict.py): ΔROUGE-L, the unsupported-mention rate and the runaway rate
  against the transformers model, and the server's parity; **ship** only when all pass;
* the smallest artifact that ships is named; the report is `deploy_report.json` plus a
  self-contained `deploy_report.html` (ship/gate_report.py), and the table is printed.
  With OUTTYPE=auto (ship/quant_ladder.py) the rungs are gated smallest first and the gate stops at
  the first that ships (`run(..., first_ship=True)`); the others are reported as not needed.

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
from finetuneflow.ship.gate_run import Side, estimated_finish, run_side, summaries_alone
from finetuneflow.ship.gate_verdict import (Margins, hold_reason, judge, means, rate_criterion, rule_text, scores_of,
                                            server_criterion, smallest_shipping)

GATE_MODES = ("on", "off")


@dataclass
class Artifact:
    label: str                       # the output type: q8_0, q4_k_m, int8, ...
    path: Path                       # what loads now (the converted, not yet published, copy)
    final: Path                      # where it is published
    runtime: str                     # llama.cpp | ctranslate2
    skipped: str | None = None       # why it cannot run here (it is reported, never judged)
    modelfile: str | None = None     # the Ollama Modelfile written with it (the server step's parameters)
    notes: tuple[str, ...] = ()      # how it was made (an importance matrix, ...)

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


class DeployGate:
    """One gate over the artifacts of one export (see the module docstring)."""

    def __init__(self, source, settings, resolved, log=print):
        self.source, self.settings, self.resolved, self.log = source, settings, resolved, log
        self.input = gate_input(source, settings, resolved)
        self.margins = Margins(settings.unsupported_margin, settings.runaway_margin)
        self._references: dict[Decoding, Side] = {}
        self._said: set[str] = set()     # a skipped step's line is printed once per run

    def reference(self, decoding: Decoding) -> Side:
        """The transformers side for `decoding`: the evaluation's predictions when they were made
        with it, else the source model run now (once per decoding)."""
        if decoding in self._references:
            return self._references[decoding]
        evaluation = self.input.evaluation
        if evaluation is not None and decoding == evaluation.decoding:
            from finetuneflow.model.family import CAUSAL
            from finetuneflow.model.loading import load_tokenizer
            rows = evaluation.rows[:len(self.input.rows)]
            summaries = [r["prediction"] for r in rows]
            max_new = CAUSAL.resolve_generation(None, decoding.generation).max_new
            side = Side(summaries, evaluation.record.get("timing", {}),
                        f"the predictions in {portable(evaluation.predictions)} (speed as eval_bart_lora.py measured "
                        f"it on {evaluation.record.get('device', '?')})",
                        {**decoding.as_dict(), "backend": "transformers"},
                        finish_reasons=estimated_finish(load_tokenizer(str(self.source.path), self.source.family),
                                                        summaries, max_new),
                        finish_how=f"estimated: the evaluation's CSV records no finish reason, so a prediction of "
                                   f">= {max_new} tokens (re-encoded) counts as one that hit the limit")
        else:
            self.log(f"deploy gate: summarizing {len(self.input.rows)} rows with the transformers model")
            side = run_side(self.source.reference_model(), self.input.rows, decoding, self.settings.batch_size,
                            f"{portable(self.source.path)} run now with the same decoding as the artifacts")
        self._references[decoding] = side
        return side

    def in_process(self, artifact: Artifact, decoding: Decoding):
        """The artifact's own run, and what the server step needs (gathered while it is loaded)."""
        from finetuneflow.model.family import CAUSAL
        from finetuneflow.model.loading import load_model
        from finetuneflow.ship.gate_server import ServerPlan, context_size, modelfile_parameters, skip_reason
        self.log(f"deploy gate: {artifact.final.name} ({artifact.runtime}) summarizes {len(self.input.rows)} rows")
        loaded = load_model(str(artifact.path))
        try:
            side = run_side(loaded, self.input.rows, decoding, self.settings.batch_size, "run now")
            if artifact.runtime != "llama.cpp" or self.settings.server == "off":
                return side, None
            reason = skip_reason(loaded)
            if reason is not None:
                return side, reason
            served, note = decoding.served()
            texts = side if note is None else run_side(loaded, self.input.rows, served, self.settings.batch_size,
                                                       "as served", warm_up=False)
            max_new = CAUSAL.resolve_generation(None, served.generation).max_new
            params = modelfile_parameters(artifact.modelfile, max_new)
            excluded = [i for i, (cut, w) in enumerate(zip(side.truncated, side.windows or [1] * len(side.truncated)))
                        if cut or w > 1]
            args = ("-ctk", "f32", "-ctv", "f32", "-fa", "off") if loaded.model.file_type == "f32" else ()
            plan = ServerPlan(texts.summaries, excluded,
                              context_size(loaded, self.input.rows, decoding.instruction or "", params["num_predict"]),
                              loaded.model.n_threads, note or "the same run", args)
            return side, (plan, served, params)
        finally:
            loaded.backend.close(loaded)

    def server(self, artifact: Artifact, prepared) -> dict:
        """llama-server's summaries of the rows against the in-process ones (ship/gate_server.py)."""
        from finetuneflow.model.loading import load_model
        from finetuneflow.ship.gate_server import compare, differs, server_lines, server_texts
        if prepared is None:
            return {"skipped": "SERVER=off" if artifact.runtime == "llama.cpp" else "not a GGUF"}
        if isinstance(prepared, str):
            result = {"skipped": prepared}
        else:
            plan, served, params = prepared
            rows = self.input.rows
            try:
                texts, reasons, how = server_texts(artifact.path, rows, served.instruction or "", params, plan,
                                                   self.settings.server_port, plan.args, self.log, artifact.final.name)
            except UserError as exc:   # the server users would run fails on this file: a finding, not a crash
                if "SERVER_PORT" in str(exc):
                    raise
                result = {"failed": str(exc)}
                for line in server_lines(artifact.label, result):
                    self.log(line)
                return result
            differing = [i for i in range(len(rows))
                         if i not in set(plan.excluded) and differs(plan.texts[i], texts[i])]
            alone = {}
            if differing:
                loaded = load_model(str(artifact.path))
                try:
                    alone = dict(zip(differing, summaries_alone(loaded, [rows[i] for i in differing], served)))
                finally:
                    loaded.backend.close(loaded)
            result = {**compare(rows, plan.texts, texts, plan.excluded, alone), "how": how, "in_process": plan.how,
                      "rougeL": means(scores_of(texts, rows))["rougeL"],
                      "runaway": sum(r == "length" for r in reasons),
                      "summaries": [{"id": r["id"], "summary": t, "finish_reason": f}
                                    for r, t, f in zip(rows, texts, reasons)]}
        if "skipped" in result:
            if result["skipped"] not in self._said:
                self._said.add(result["skipped"])
                self.log(f"deploy gate: llama-server step skipped: {result['skipped']}")
            return result
        for line in server_lines(artifact.label, result):
            self.log(line)
        return result

    def criteria(self, reference: Side, side: Side, server: dict) -> tuple[dict, ...]:
        """Unsupported mentions, runaways and the server's parity (ΔROUGE-L is judge's own)."""
        rows = self.input.rows
        out = [rate_criterion("unsupported_mentions", reference.unsupported(rows), side.unsupported(rows),
                              self.margins.unsupported)]
        if reference.runaway() is None or side.runaway() is None:
            out.append({"name": "runaway", "passed": None, "skipped": "no finish reasons recorded"})
        else:
            out.append(rate_criterion("runaway", reference.runaway(), side.runaway(), self.margins.runaway,
                                      reference_how=reference.finish_how))
        out.append(server_criterion(server))
        return tuple(out)

    def artifact_row(self, artifact: Artifact) -> dict:
        row = {"label": artifact.label, "file": portable(artifact.final), "runtime": artifact.runtime,
               "bytes": artifact.bytes, "notes": list(artifact.notes)}
        if artifact.skipped:
            return {**row, "verdict": "not run", "why": artifact.skipped}
        decoding, note = self.input.decoding.for_runtime(artifact.runtime)
        reference = self.reference(decoding)
        side, prepared = self.in_process(artifact, decoding)
        server = self.server(artifact, prepared)
        ref_scores, scores = scores_of(reference.summaries, self.input.rows), scores_of(side.summaries, self.input.rows)
        row.update(samples_per_s=side.timing.get("samples_per_s"), timing=side.timing, **means(scores),
                   **judge(ref_scores, scores, reference.summaries, side.summaries,
                           self.criteria(reference, side, server)),
                   transformers={"how": reference.how, "samples_per_s": reference.timing.get("samples_per_s"),
                                 **means(ref_scores)},
                   server=server, decoding=side.decoding, decoding_note=note,
                   summaries=[{"id": r["id"], "summary": s, "rougeL": round(x["rougeL"], 2), "finish_reason": f}
                              for r, s, x, f in zip(self.input.rows, side.summaries, scores,
                                                    side.finish_reasons or [None] * len(scores))])
        if row["verdict"] == "hold":
            self.log(f"  {hold_reason(row)}")
        return row

    def _rows(self, artifacts: list[Artifact], first_ship: bool) -> list[dict]:
        rows, shipped = [], None
        for artifact in artifacts:
            if shipped is not None:
                rows.append({"label": artifact.label, "file": portable(artifact.final), "runtime": artifact.runtime,
                             "bytes": artifact.bytes, "notes": list(artifact.notes), "verdict": "not gated",
                             "why": f"a smaller rung ({shipped}) ships"})
                continue
            rows.append(self.artifact_row(artifact))
            if first_ship and rows[-1]["verdict"] == "ship":
                shipped = artifact.label
        return rows

    def run(self, artifacts: list[Artifact], first_ship: bool = False) -> dict:
        """Every artifact judged (first_ship: in the given order, stopping at the first that ships)."""
        started = time.perf_counter()
        rows = self._rows(artifacts, first_ship)
        judged = [r for r in rows if "transformers" in r]
        reference = dict(judged[0]["transformers"]) if judged else {}
        reference.update(label="transformers", file=portable(self.source.path), runtime="transformers",
                         bytes=weights_bytes(self.source.path))
        for name in ("unsupported_mentions", "runaway"):
            found = next((c for r in judged for c in r["criteria"] if c["name"] == name and "reference_rate" in c),
                         None)
            reference[name] = found["reference_rate"] if found else None
        best = smallest_shipping(rows)
        report = {"stage": "export_gguf", "gate": "deploy", "model": portable(self.source.path),
                  "rows": {"count": len(self.input.rows), "from": self.input.description,
                           "ids_sha256": ids_digest(r["id"] for r in self.input.rows)},
                  "decoding": self.input.decoding.as_dict(), "rule": rule_text(self.margins),
                  "margins": {"unsupported_mentions": self.margins.unsupported, "runaway": self.margins.runaway},
                  "reference": reference, "artifacts": rows, "smallest_shipping": best["file"] if best else None,
                  "notes": self.input.notes + [f"{r['label']}: {r['decoding_note']}" for r in rows
                                               if r.get("decoding_note")],
                  "seconds": round(time.perf_counter() - started, 1)}
        for line in console_lines(report):
            self.log(line)
        return report

    def require_ship(self, report: dict) -> None:
        """REQUIRE_SHIP=True: every artifact must ship, or nothing is written."""
        held = [r for r in report["artifacts"] if r["verdict"] not in ("ship", "not gated")]
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
