"""The faithfulness part of report.html: check rates with intervals, the coverage chart, and the
worst examples with their offending spans highlighted."""
from __future__ import annotations

import html
import json
from pathlib import Path

from finetuneflow.quality import faithfulness as F
from finetuneflow.quality.report import COLORS, img_tag, pyplot, save_figure, fit_category_labels
from finetuneflow.quality.scoring import VersionScores

esc = html.escape


def coverage_chart(versions: list[VersionScores], path: Path) -> Path:
    """Where each version's summaries draw from: mean share of the first, middle and last third."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(versions) + 2), 3.4))
    bottom = [0.0] * len(versions)
    for k, segment in enumerate(F.SEGMENTS):
        values = [v.summary.get(f"faith_coverage_{segment}") or 0.0 for v in versions]
        ax.bar(range(len(versions)), values, bottom=bottom, label=f"{segment} third",
               color=COLORS[k % len(COLORS)])
        bottom = [b + x for b, x in zip(bottom, values)]
    ax.set_xticks(range(len(versions)))
    ax.set_ylabel("share of the summary's content")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))   # beside the bars, never on them
    ax.set_title("Coverage by position: which third\nof the dialogue the summary draws on", fontsize=9)
    fit_category_labels(fig, ax, [v.name for v in versions])
    return save_figure(fig, path)


def _rate_cell(summary: dict, check: str) -> str:
    rate = summary.get(f"check_{check}_rate")
    if rate is None:
        return "<td class='small'>n/a</td>"
    return (f"<td><b>{rate:.1%}</b> <span class='small'>[{summary[f'check_{check}_low']:.1%}, "
            f"{summary[f'check_{check}_high']:.1%}] of {summary[f'check_{check}_n']}</span></td>")


def highlight(text: str, spans: list[dict]) -> str:
    """`text` HTML-escaped with each unsupported span in <mark>."""
    out, last = [], 0
    for span in sorted(spans, key=lambda s: s.get("start", 0)):
        start, end = int(span.get("start", 0)), int(span.get("end", 0))
        if start < last or end <= start:
            continue
        out += [esc(text[last:start]), f"<mark title='{esc(str(span.get('kind', '')))}'>{esc(text[start:end])}</mark>"]
        last = end
    return "".join(out + [esc(text[last:])])


def worst_examples(version: VersionScores, k: int) -> list[str]:
    frame = version.frame
    flagged = frame[(frame["unsupported_count"].fillna(0) > 0) | (frame["support_min"].fillna(1) < F.SUPPORT_THRESHOLD)]
    flagged = flagged.sort_values(["unsupported_count", "support_min"], ascending=[False, True]).head(k)
    if flagged.empty:
        return [f"<p>{esc(version.name)}: no summary flagged by a shipped check.</p>"]
    parts = [f"<h3>{esc(version.name)}: the summaries to check first</h3><table><tr><th>id</th><th>summary "
             "(unsupported spans marked)</th><th>weakest sentence</th><th>unsupported</th><th>support min</th></tr>"]
    for _, row in flagged.iterrows():
        spans = json.loads(row["unsupported_spans"] or "[]")
        parts.append(f"<tr><td>{esc(str(row['id']))}</td><td>{highlight(str(row['prediction']), spans)}</td>"
                     f"<td class='small'>{esc(str(row['weakest_sentence'] or ''))}</td>"
                     f"<td>{int(row['unsupported_count'] or 0)}</td><td>{_num(row['support_min'])}</td></tr>")
    return parts + ["</table>"]


def _num(value) -> str:
    try:
        return "n/a" if value is None or value != value else f"{float(value):.2f}"
    except (TypeError, ValueError):
        return "n/a"


def faithfulness_section(versions: list[VersionScores], pairs: list[dict], examples: int,
                         coverage_chart_path: Path | None) -> list[str]:
    """Rates with intervals per version, the validation behind each check, coverage, worst examples."""
    if not any(v.frame["check_unsupported_mentions"].notna().any() for v in versions):
        notes = "; ".join(sorted({n for v in versions for n in v.notes if "faithfulness" in n})) or "no dialogues"
        return [f"<h2>Faithfulness</h2><p class='small'>Not computed: {esc(notes)}.</p>"]
    parts = ["<h2>Faithfulness: did the summary say something the dialogue did not?</h2>",
             "<p class='small'>Checks read each summary against its own dialogue (no reference). Shipped checks "
             "caught &ge;80% of their own corruption with &le;10% false alarms on human references "
             "(benchmarks/bench_faithfulness.py); experimental ones did not and are shown for information. "
             "Paired comparisons of these rates are in the tables above.</p>",
             "<table><tr><th>check</th><th>validation</th>" + "".join(f"<th>{esc(v.name)}</th>" for v in versions)
             + "</tr>"]
    for check, rule in F.CHECKS.items():
        status = "shipped" if F.is_shipped(check) else "experimental"
        validation = ", ".join(f"{k} {v:.0%}" for k, v in F.VALIDATION.get(check, {}).items())
        parts.append(f"<tr><td>{esc(check)} <span class='small'>({status})</span><br><span class='small'>"
                     f"{esc(rule)}</span></td><td class='small'>{esc(validation)}</td>"
                     + "".join(_rate_cell(v.summary, check) for v in versions) + "</tr>")
    for column in ("support_mean", "middle_recall", "coverage_beyond_limit"):
        parts.append(f"<tr><td>{esc(column)}</td><td></td>"
                     + "".join(f"<td>{_num(v.summary.get('faith_' + column))}</td>" for v in versions) + "</tr>")
    parts.append("</table>")
    for v in versions:
        if v.summary.get("faithfulness_notes"):
            parts.append(f"<p class='small'>{esc(v.name)}: {esc(v.summary['faithfulness_notes'])}</p>")
    if coverage_chart_path is not None:
        parts.append(img_tag(coverage_chart_path))
    for version in versions[-1:] if len(versions) > 1 else versions:
        parts += worst_examples(version, max(1, examples))
    return parts
