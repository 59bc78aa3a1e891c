"""OUTTYPE=auto: try a ladder of GGUF types and ship the smallest whose deploy gate passes.

Users try f16/q8/q5/q4 by hand and guess. With `--OUTTYPE=auto` the export makes every type of
LADDER (default q8_0, q6_k, q5_k_m, q4_k_m, iq4_xs, q3_k_m; with IMATRIX, the low-bit ones from
llama.cpp's importance matrix), verifies each, then gates them smallest file first and stops at
the first that ships: it is the smallest artifact whose gate passes (a rung whose verification
fails is reported and skipped). Only that type is written, with its Modelfile, usage note,
reports and record; the deploy report shows every rung (verdict, or "not gated": a smaller rung
ships). No rung ships -> one error line, nothing written (the table is printed first).
"""
from __future__ import annotations

from finetuneflow.contract.errors import UserError

AUTO = "auto"


def is_auto(settings) -> bool:
    return AUTO in settings.outtype


def check(settings) -> None:
    """OUTTYPE=auto stands alone, needs the gate, and every rung is a type this stage writes."""
    from finetuneflow.ship.quantize import OUTTYPES
    if not is_auto(settings):
        return
    if len(settings.outtype) > 1:
        others = ", ".join(t for t in settings.outtype if t != AUTO)
        raise UserError(f"OUTTYPE=auto chooses one type from LADDER; drop {others} from OUTTYPE or name the types "
                        f"without auto")
    unknown = [t for t in settings.ladder if t not in OUTTYPES]
    if unknown:
        raise UserError(f"LADDER has {unknown[0]!r}, not a GGUF type this stage writes; pick from "
                        f"{', '.join(OUTTYPES)}")
    if settings.gate != "on":
        raise UserError("OUTTYPE=auto picks the smallest type whose deploy gate passes, so it needs GATE=on; name a "
                        "type (OUTTYPE=q8_0) to export without the gate")


def kinds(settings) -> list[str]:
    return list(settings.ladder) if is_auto(settings) else list(settings.outtype)


def order(artifacts: list) -> list:
    """Smallest file first (the first rung that ships is then the smallest that ships)."""
    return sorted(artifacts, key=lambda a: a.bytes)


def chosen(settings, deploy: dict | None, log=print) -> list[str]:
    """The one kind OUTTYPE=auto publishes (its report names the ladder, the console says it), or one
    error line."""
    from finetuneflow.ship.gate_report import ladder_line
    from finetuneflow.ship.gate_verdict import hold_reason
    if deploy is None:
        raise UserError("OUTTYPE=auto needs the deploy gate (GATE=on)")
    best = next((r for r in deploy["artifacts"] if r["file"] == deploy.get("smallest_shipping")), None)
    deploy["ladder"] = {"rungs": list(settings.ladder), "chosen": best["label"] if best else None,
                        "order": "smallest file first; the gate stops at the first rung that ships",
                        "sizes": {r["label"]: r["bytes"] for r in deploy["artifacts"]}}
    log("  " + ladder_line(deploy))
    if best is None:
        reasons = "; ".join(hold_reason(r) for r in deploy["artifacts"])
        raise UserError(f"OUTTYPE=auto: no rung of {','.join(settings.ladder)} passes the deploy gate ({reasons}); "
                        f"nothing was written")
    return [best["label"]]
