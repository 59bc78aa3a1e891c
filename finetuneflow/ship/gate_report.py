"""The deploy gate's report as people read it: the table (console and HTML), the line naming the
smallest artifact that ships, and a self-contained `deploy_report.html` (`deploy_section(report)`
gives the same section for another HTML report). The JSON report is the dict DeployGate.run
returns (ship/deploy_gate.py); this module only renders it.
"""
from __future__ import annotations

import html
from pathlib import Path


def _mb(n) -> str:
    return f"{n / 1e6:.1f}" if isinstance(n, (int, float)) else "-"


def _num(x, fmt="{:.2f}") -> str:
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


HEADER = ["artifact", "runtime", "size MB", "samples/s", "ROUGE-1", "ROUGE-2", "ROUGE-L", "ΔROUGE-L [95% CI]",
          "unsupported %", "runaway %", "identical", "llama-server", "verdict"]


def _criterion(row: dict, name: str) -> dict:
    return next((c for c in row.get("criteria", []) if c["name"] == name), {})


def _rate_cell(criterion: dict) -> str:
    if "rate" not in criterion:
        return "-"
    return f"{criterion['rate']:.0f} ({criterion['delta']['mean']:+.0f}; ≤{criterion['delta']['high']:+.0f})"


def _server_cell(row: dict) -> str:
    server = row.get("server") or {}
    if "failed" in server:
        return "failed"
    if "identical_share" not in server:
        return "skipped" if server.get("skipped") else "-"
    share = server["identical_share"]
    return f"{share:.0%} · RL {server['rougeL']:.2f}" if share is not None else "-"


def _verdict_cell(row: dict) -> str:
    failed = row.get("failed") or []
    return f"{row['verdict']} ({', '.join(failed)})" if failed else row["verdict"]


def table_rows(report: dict) -> list[list[str]]:
    """The table both the console and the HTML show: the transformers model, then each artifact."""
    ref = report.get("reference") or {}
    out = [list(HEADER),
           [f"{Path(str(ref.get('file', 'model'))).name} (source)", "transformers", _mb(ref.get("bytes")),
            _num(ref.get("samples_per_s"), "{:.3g}"), _num(ref.get("rouge1")), _num(ref.get("rouge2")),
            _num(ref.get("rougeL")), "reference", _num(ref.get("unsupported_mentions"), "{:.0f}"),
            _num(ref.get("runaway"), "{:.0f}"), "-", "-", "-"]]
    for r in report.get("artifacts", []):
        if r["verdict"] in ("not run", "not gated"):
            out.append([Path(r["file"]).name, r["runtime"], _mb(r["bytes"])] + ["-"] * 9 + [r["verdict"]])
            continue
        d = r["delta_rougeL"]
        out.append([Path(r["file"]).name, r["runtime"], _mb(r["bytes"]), _num(r.get("samples_per_s"), "{:.3g}"),
                    _num(r["rouge1"]), _num(r["rouge2"]), _num(r["rougeL"]),
                    f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]",
                    _rate_cell(_criterion(r, "unsupported_mentions")), _rate_cell(_criterion(r, "runaway")),
                    f"{r['identical_share']:.0%}", _server_cell(r), _verdict_cell(r)])
    return out


def console_lines(report: dict) -> list[str]:
    rows = table_rows(report)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [f"deploy gate on {report['rows']['from']}:"]
    lines += ["  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                                enumerate(zip(row, widths))) for row in rows]
    lines.append("  " + summary_line(report))
    lines.append("  (unsupported % and runaway %: the artifact's share of summaries, its difference to the "
                 "transformers model and the upper bound of that difference's 95% CI; llama-server: summaries "
                 "identical to the in-process run, and the server's own ROUGE-L)")
    lines += [f"  note: {n}" for n in report.get("notes", [])]
    for r in report.get("artifacts", []):
        if r["verdict"] in ("not run", "not gated"):
            lines.append(f"  {r['label']} {r['verdict']}: {r['why']}")
    if report.get("ladder"):
        lines.append("  " + ladder_line(report))
    return lines


def ladder_line(report: dict) -> str:
    ladder = report["ladder"]
    chosen = ladder.get("chosen")
    tried = ", ".join(f"{r['label']} {r['verdict']}" for r in report["artifacts"])
    return (f"OUTTYPE=auto chose {chosen} (the smallest rung that passes the gate; {tried})" if chosen
            else f"OUTTYPE=auto: no rung of {', '.join(ladder['rungs'])} passes the gate ({tried})")


def imatrix_line(imatrix: dict) -> str:
    rows = imatrix.get("rows") or {}
    where = f" from {rows['count']} rows of {rows['file']} ({rows['split']} split)" if rows else ""
    return (f"The low-bit types were quantized with llama.cpp's importance matrix {imatrix['file']} "
            f"(sha256 {imatrix['sha256'][:16]}, {imatrix['source']}{where}).")


def summary_line(report: dict) -> str:
    best = report.get("smallest_shipping")
    if best:
        row = next(r for r in report["artifacts"] if r["file"] == best)
        return f"smallest artifact that ships: {best} ({_mb(row['bytes'])} MB)"
    judged = [r for r in report.get("artifacts", []) if r["verdict"] not in ("not run", "not gated")]
    return "no artifact ships: each fails a criterion of the rule (see the verdict column)" if judged else \
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
           f"<p>{e(str(report['rows']['count']))} rows: {e(report['rows']['from'])}.</p>",
           "<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in rows[0]) + "</tr>"]
    for row in rows[1:]:
        css = {"ship": "ship", "hold": "hold", "not run": "notrun", "not gated": "notrun"}.get(row[-1].split(" (")[0],
                                                                                             "")
        out.append(f"<tr class='{css}'>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>")
    out += ["</table>", f"<p><b>{e(summary_line(report))}</b></p>"]
    if report.get("ladder"):
        out.append(f"<p><b>{e(ladder_line(report))}</b></p>")
    if report.get("imatrix"):
        out.append(f"<p>{e(imatrix_line(report['imatrix']))}</p>")
    out += _criteria_html(report)
    decoding = ", ".join(f"{k} {v}" for k, v in report.get("decoding", {}).items()
                         if v is not None and k != "instruction")
    out.append(f"<p>Decoding: {e(decoding)}; the transformers side: "
               f"{e(str((report.get('reference') or {}).get('how', '-')))}.</p>")
    if report.get("notes"):
        out += ["<ul>"] + [f"<li>{e(n)}</li>" for n in report["notes"]] + ["</ul>"]
    out += _audit_html(report) + _examples_html(report)
    return out


def _criterion_numbers(c: dict) -> str:
    if c.get("passed") is None:
        return f"not measured: {c.get('skipped', '-')}"
    d = c.get("delta") or {}
    if c["name"] == "rougeL":
        return f"Δ {d['mean']:+.2f}, 95% CI [{d['low']:+.2f}, {d['high']:+.2f}]"
    if c["name"] == "server" and "failed" in c:
        return c["failed"]
    if c["name"] == "server":
        text = (f"{c['identical']}/{c['compared']} identical; {len(c['noise'])} batch-noise row(s); "
                f"{len(c['beyond_noise'])} beyond noise; server ROUGE-L {c['rougeL']:.2f}, {c['runaway']} hit "
                f"num_predict")
        first = c.get("first_difference")
        if first and c["beyond_noise"]:
            text += f"; first: row {first['id']}: in-process {first['in_process']!r} vs server {first['server']!r}"
        return text
    return (f"{c['rate']:.1f}% vs {c['reference_rate']:.1f}% ({c['count']} vs {c['reference_count']} of {c['rows']}); "
            f"Δ {d['mean']:+.1f} points, 95% CI [{d['low']:+.1f}, {d['high']:+.1f}], margin +{c['margin']:g}")


def _criteria_html(report: dict) -> list[str]:
    """Each artifact's criteria: the rule, its numbers, passed or failed."""
    e = html.escape
    judged = [r for r in report.get("artifacts", []) if r.get("criteria")]
    if not judged:
        return []
    out = ["<h3>The verdict's criteria</h3>", "<table><tr><th>artifact</th><th>criterion</th><th>rule</th>"
           "<th>numbers</th><th>result</th></tr>"]
    for r in judged:
        for c in r["criteria"]:
            result = {True: "pass", False: "FAIL", None: "not measured"}[c.get("passed")]
            css = {True: "ship", False: "hold", None: "notrun"}[c.get("passed")]
            out.append(f"<tr class='{css}'><td>{e(r['label'])}</td><td>{e(c['name'])}</td><td>{e(c.get('rule', ''))}"
                       f"</td><td>{e(_criterion_numbers(c))}</td><td>{e(result)}</td></tr>")
    return out + ["</table>"]


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
    columns = []
    for r in judged:
        columns.append((r["label"], {s["id"]: s["summary"] for s in r["summaries"]}))
        if (r.get("server") or {}).get("summaries"):
            columns.append((f"{r['label']} (llama-server)", {s["id"]: s["summary"] for s in r["server"]["summaries"]}))
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
