"""The shipped faithfulness checks of one finished summary, as every surface shows them: the
server's `ftf.checks` (JSON), inference_bart_lora.py's output columns and its `!` line.

`report_checks(summary, dialogue, encoder)` runs the checks shipped for a dialogue of that length
(quality/faithfulness.py `check_summary`: unsupported mentions; the weakest sentence's support
when a sentence encoder is given) and returns a plain dict:

    {"checked": ["unsupported_mentions", "unsupported_sentence"],   the checks that ran
     "flagged": true,                                              any check flagged the summary
     "flags": {"unsupported_mentions": true, "unsupported_sentence": false},   (None: no answer)
     "spans": [{"check", "start", "end", "text", "why"}],          summary[start:end] == text
     "notes": [...],                                               why a check gave no answer
     "validation": {check: {its error: detection, "false_alarms": rate}},   benchmarks/faithfulness.md
     "seconds": 0.001}

A dialogue longer than the checks were validated for (a meeting, over VALIDATED_MAX_WORDS words)
gets `"checked": []`, no flags, and `"skipped"` saying so. A check that fails inside never fails
the caller: the dict then has `"error": "<type>: <message>"` (and the failure is logged).
"""
from __future__ import annotations

import logging
import time

from finetuneflow.quality.faithfulness import VALIDATED_MAX_WORDS, VALIDATION, check_summary, shipped_checks

log = logging.getLogger("finetuneflow.quality")
VALIDATED_ON = "held-out DialogSum dev rows 250-499 (benchmarks/bench_faithfulness.py, BENCHMARKS.md)"
READER_NOTE = {"unsupported_mentions": "not in the dialogue",
               "unsupported_sentence": "no part of the dialogue says this",
               "misattribution": "said by another speaker"}


def report_checks(summary: str, dialogue: str, encoder=None, *, check=None) -> dict:
    """The shipped checks of `summary` against `dialogue` (see the module doc); never raises."""
    start = time.perf_counter()
    try:
        found = (check or check_summary)(summary, dialogue, encoder=encoder)
    except Exception as exc:  # noqa: BLE001  a failing check must not fail the summary
        log.error("a faithfulness check failed (the summary is returned unchecked)", exc_info=exc)
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return {"checked": [], "flagged": False, "flags": {}, "spans": [], "notes": [],
                "error": f"{type(exc).__name__}: {message}".rstrip(": "),
                "seconds": round(time.perf_counter() - start, 4)}
    checked = list(found.flags)
    report = {"checked": checked, "flagged": any(bool(v) for v in found.flags.values()), "flags": found.flags,
              "spans": [{"check": s.check, "start": s.start, "end": s.end, "text": s.text, "why": s.why,
                         "label": READER_NOTE.get(s.check, s.why)} for s in found.spans],
              "notes": found.notes, "validation": {c: VALIDATION[c] for c in checked if c in VALIDATION},
              "validated_on": VALIDATED_ON, "seconds": round(time.perf_counter() - start, 4)}
    if not shipped_checks(len(dialogue.split())):
        report["skipped"] = (f"the dialogue has {len(dialogue.split())} words; the checks were validated on "
                             f"dialogues of up to {VALIDATED_MAX_WORDS} words (not on meetings), so none ran")
    return report


def flagged_line(report: dict | None) -> str | None:
    """The `!` line a terminal shows under a flagged summary (None when nothing to say)."""
    if not report:
        return None
    if report.get("error"):
        return f"! checks failed: {report['error']}"
    if not report.get("spans"):
        return None
    return "! " + "; ".join(f"{s['text']!r}: {s['why']}" for s in report["spans"])


def report_columns(report: dict | None) -> dict:
    """An output file's columns for one summary: flagged (yes/no/empty), the spans (JSON), notes."""
    import json
    if not report:
        return {"checks_flagged": "", "checks_spans": "", "checks_notes": ""}
    if report.get("error"):
        return {"checks_flagged": "", "checks_spans": "", "checks_notes": f"error: {report['error']}"}
    notes = report.get("notes", []) + ([report["skipped"]] if report.get("skipped") else [])
    return {"checks_flagged": "" if not report["checked"] else ("yes" if report["flagged"] else "no"),
            "checks_spans": json.dumps(report["spans"], ensure_ascii=False) if report["spans"] else "",
            "checks_notes": "; ".join(notes)}


def report_many(summaries: list[str], dialogues: list[str], encoder_setting=None) -> list[dict]:
    """`report_checks` of every summary, the encoder loaded once (only when some dialogue is short
    enough for the checks: quality/encoder.py `load_encoder`; "" = none)."""
    encoder = None
    if any(shipped_checks(len(d.split())) for d in dialogues) and encoder_setting != "":
        from finetuneflow.quality.encoder import load_encoder
        try:
            encoder = load_encoder(encoder_setting)[0]
        except Exception as exc:  # noqa: BLE001  the mention check still runs
            log.error("the checks' sentence encoder did not load", exc_info=exc)
    return [report_checks(s, d, encoder) for s, d in zip(summaries, dialogues)]


def checks_totals(reports: list[dict | None]) -> dict:
    """What a run record keeps of the checks: how many summaries were checked, flagged, failed."""
    done = [r for r in reports if r]
    return {"checked": sum(1 for r in done if r.get("checked")), "flagged": sum(1 for r in done if r.get("flagged")),
            "errors": sum(1 for r in done if r.get("error")),
            "skipped_long": sum(1 for r in done if r.get("skipped")),
            "seconds": round(sum(r.get("seconds", 0.0) for r in done), 4)}
