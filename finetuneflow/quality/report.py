"""Charts and the self-contained HTML report of eval_metrics_bart_lora.py.

Charts are written as PNG files and embedded in `report.html` as base64, so the report is one
file that opens anywhere (Colab download, e-mail, CI artifact) with no network.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import re
from itertools import combinations
from pathlib import Path

from finetuneflow.quality import metrics as M
from finetuneflow.quality.scoring import METRIC_LABELS, VersionScores
from finetuneflow.contract.io import atomic_path
from finetuneflow.contract.paths import project_relative

esc = html.escape
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    pyplot().close(fig)
    return path


def wrap_label(name: str, width: int = 14) -> str:
    """A category name in lines of at most `width` characters, broken after `_`, `-`, `/`, `.` or a
    space (a longer piece is cut)."""
    lines, line = [], ""
    for piece in re.findall(r"[^_/. -]*[_/. -]*", str(name)):
        while len(piece) > width:
            lines, line, piece = lines + ([line] if line else []) + [piece[:width]], "", piece[width:]
        if line and len(line) + len(piece.rstrip()) > width:
            lines, line = lines + [line], ""
        line += piece
    return "\n".join(text.rstrip() for text in [*lines, line] if text.strip()) or str(name)


def overlapping_labels(fig) -> list[tuple[str, str]]:
    """Pairs of tick labels (on the same axis) whose drawn boxes overlap, and labels that stick
    out of the figure (paired with "figure edge")."""
    fig.canvas.draw()
    renderer, edge = fig.canvas.get_renderer(), fig.bbox
    found = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            slack = 1e-9 * max(1.0, abs(high - low))
            shown = [label for tick in axis.get_major_ticks() if low - slack <= tick.get_loc() <= high + slack
                     for label in (tick.label1, tick.label2) if label.get_visible() and label.get_text().strip()]
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in shown]
            found += [(a, b) for (a, box_a), (b, box_b) in combinations(boxes, 2)
                      if box_a.x0 < box_b.x1 - 0.5 and box_b.x0 < box_a.x1 - 0.5
                      and box_a.y0 < box_b.y1 - 0.5 and box_b.y0 < box_a.y1 - 0.5]
            found += [(text, "figure edge") for text, box in boxes if box.x0 < edge.x0 - 0.5 or box.x1 >
                      edge.x1 + 0.5 or box.y0 < edge.y0 - 0.5 or box.y1 > edge.y1 + 0.5]
    return found


def fit_category_labels(fig, ax, names: list[str], fontsize: int = 8) -> None:
    """Category tick labels (at the ticks already set) that never run into each other: wrapped,
    then turned 30 and 90 degrees when wrapping is not enough; the layout makes room for them."""
    ax.set_xticklabels([wrap_label(name) for name in names], fontsize=fontsize)
    for rotation in (0, 30, 90):
        for label in ax.get_xticklabels():
            label.set_rotation(rotation)
            label.set_horizontalalignment("right" if rotation == 30 else "center")
            label.set_rotation_mode("anchor" if rotation == 30 else "default")
        fig.tight_layout()
        if not overlapping_labels(fig):
            return


def rouge_chart(versions: list[VersionScores], key: str, path: Path) -> Path:
    """Mean per-sample F1 per version, with rouge-score's bootstrap interval as error bars."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(versions) + 2), 3.6))
    means = [v.summary[key] for v in versions]
    low = [max(0.0, m - v.summary[f"{key}_boot_low"]) for m, v in zip(means, versions)]
    high = [max(0.0, v.summary[f"{key}_boot_high"] - m) for m, v in zip(means, versions)]
    bars = ax.bar(range(len(versions)), means, yerr=[low, high], capsize=5,
                  color=[COLORS[i % len(COLORS)] for i in range(len(versions))])
    ax.set_xticks(range(len(versions)))
    for bar, mean in zip(bars, means):
        ax.annotate(f"{mean:.2f}", (bar.get_x() + bar.get_width() / 2, mean / 2), ha="center", va="center",
                    color="white", fontweight="bold", fontsize=10)
    ax.set_ylabel(f"{METRIC_LABELS[key]} F1 x 100")
    ax.set_title(f"{METRIC_LABELS[key]} (mean of per-sample F1; bars: bootstrap 95% interval)", fontsize=9)
    ax.set_ylim(0, max([v.summary[f"{key}_boot_high"] for v in versions] + [1.0]) * 1.2)
    fit_category_labels(fig, ax, [v.name for v in versions])
    return save_figure(fig, path)


def bucket_chart(versions: list[VersionScores], path: Path) -> Path:
    """Share of samples matching each failure rule (a sample can match several), per version."""
    plt = pyplot()
    labels = list(M.BUCKETS) + [M.OK_BUCKET]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width = 0.8 / max(1, len(versions))
    for j, version in enumerate(versions):
        n = max(1, version.summary["samples"])
        shares = [100 * version.summary[f"flag_{b}"] / n for b in M.BUCKETS] + [100 * version.summary["bucket_ok"] / n]
        ax.bar([i + j * width for i in range(len(labels))], shares, width, label=version.name,
               color=COLORS[j % len(COLORS)])
    ax.set_xticks([i + width * (len(versions) - 1) / 2 for i in range(len(labels))])
    ax.set_ylabel("% of samples")
    ax.set_title("Failure buckets (a sample can match several rules; 'ok' matches none)", fontsize=9)
    ax.legend([wrap_label(v.name, 24) for v in versions], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fit_category_labels(fig, ax, labels)
    return save_figure(fig, path)


def distribution_chart(versions: list[VersionScores], path: Path) -> Path:
    """Per-sample ROUGE-1/2/L distributions (box plots; the triangle is the mean)."""
    plt = pyplot()
    keys = ("rouge1", "rouge2", "rougeL")
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 2 * len(versions) + 6), 3.6))
    for ax, key in zip(axes, keys):
        box = ax.boxplot([v.frame[key].to_numpy() for v in versions], showmeans=True, patch_artist=True)
        for j, patch in enumerate(box["boxes"]):
            patch.set_facecolor(COLORS[j % len(COLORS)])
            patch.set_alpha(0.6)
        ax.set_xticks(range(1, len(versions) + 1))
        ax.set_title(f"{METRIC_LABELS[key]} per sample", fontsize=9)
        ax.set_ylim(-2, 102)
    for ax in axes:
        fit_category_labels(fig, ax, [v.name for v in versions])
    return save_figure(fig, path)


def img_tag(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def pick_examples(versions: list[VersionScores], shared_ids: list[str], k: int) -> list[str]:
    """Samples to show: with two or more versions, the largest ROUGE-L gains and losses of the
    last version over the first; with one, the first k."""
    if k <= 0 or not shared_ids:
        return []
    if len(versions) < 2:
        return shared_ids[:k]
    first = versions[0].frame.set_index("id").loc[shared_ids, "rougeL"]
    last = versions[-1].frame.set_index("id").loc[shared_ids, "rougeL"]
    order = (last - first).sort_values(kind="stable")
    gains = list(order.index[::-1][: k - k // 2])
    losses = [i for i in order.index[: k // 2] if i not in gains]
    return gains + losses


CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:8px 0 18px}
td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}
th{background:#f2f2f2}.sig{color:#1a7f37;font-weight:600}.ns{color:#666}.bad{color:#b42318;font-weight:600}
.good{color:#1a7f37;font-weight:600}img{max-width:100%;margin:6px 0}.small{font-size:12px;color:#555}
pre{white-space:pre-wrap;font-size:12px;margin:0;max-height:240px;overflow:auto}"""


def html_report(versions: list[VersionScores], pairs: list[dict], shared_ids: list[str], charts: dict[str, Path],
                examples: int, settings: dict, extra_sections: list[str] = ()) -> str:
    """The self-contained report page: one section per question a reader asks."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>FineTuneFlow evaluation report</title>"
             f"<style>{CSS}</style></head><body><h1>FineTuneFlow evaluation report</h1>",
             f"<p class='small'>Generated {_dt.datetime.now().isoformat(timespec='seconds')} by "
             f"eval_metrics_bart_lora.py. Scores are on the 0-100 scale; ROUGE is the mean of per-sample F1 "
             f"(rouge-score, stemming on), its interval is rouge-score's bootstrap aggregate.</p>"]
    parts += inputs_section(versions) + versions_section(versions) + comparisons_section(pairs, shared_ids, settings)
    parts += list(extra_sections)
    parts += charts_section(charts) + buckets_section(versions) + examples_section(versions, shared_ids, examples)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def inputs_section(versions: list[VersionScores]) -> list[str]:
    parts = ["<h2>Inputs</h2><table><tr><th>version</th><th>file</th><th>format</th><th>samples</th>"
             "<th>notes</th></tr>"]
    for v in versions:
        notes = "; ".join(v.notes + [f"truncated inputs: {v.truncation_source}"])
        parts.append(f"<tr><td>{esc(v.name)}</td><td>{esc(project_relative(v.source.path))}</td><td>{esc(v.source.format)}</td>"
                     f"<td>{v.summary['samples']}</td><td class='small'>{esc(notes)}</td></tr>")
    return parts + ["</table>"]


def versions_section(versions: list[VersionScores]) -> list[str]:
    parts = ["<h2>Versions side by side</h2><table><tr><th>metric</th>"
             + "".join(f"<th>{esc(v.name)}</th>" for v in versions) + "</tr>"]
    for key in M.ROUGE_KEYS:
        cells = "".join(f"<td><b>{v.summary[key]:.2f}</b> <span class='small'>[{v.summary[key + '_boot_low']:.2f}, "
                        f"{v.summary[key + '_boot_high']:.2f}]</span></td>" for v in versions)
        parts.append(f"<tr><td>{METRIC_LABELS[key]}</td>{cells}</tr>")
    rows = [("BERTScore F1", "bertscore_f1"), ("BLEU (sacreBLEU, corpus)", "bleu"),
            ("chrF (sacreBLEU, corpus)", "chrf"),
            ("prediction words (mean)", "pred_words_mean"), ("reference words (mean)", "ref_words_mean"),
            ("length ratio prediction/reference", "len_ratio_mean"),
            ("compression prediction/dialogue", "compression_mean")]
    for label, key in rows:
        digits = 3 if key in ("len_ratio_mean", "compression_mean") else 2
        parts.append(f"<tr><td>{label}</td>" + "".join(f"<td>{_fmt(v.summary[key], digits)}</td>" for v in versions)
                     + "</tr>")
    parts.append("<tr><td>BERTScore</td>" + "".join(f"<td class='small'>{esc(v.bertscore.note)}</td>" for v in versions)
                 + "</tr>")
    parts.append("<tr><td>references per row</td>" + "".join(
        f"<td class='small'>{v.summary.get('references', 1)}: {esc(v.summary.get('reference_rule', ''))}</td>"
        for v in versions) + "</tr></table>")
    signatures = {v.summary["bleu_signature"] for v in versions} | {v.summary["chrf_signature"] for v in versions}
    return parts + ["<p class='small'>sacreBLEU signatures: " + "<br>".join(esc(s) for s in sorted(signatures))
                    + "</p>"]


def pair_table(pair: dict, confidence: float) -> list[str]:
    parts = [f"<h3>{esc(pair['b'])} &minus; {esc(pair['a'])}</h3><table><tr><th>metric</th><th>{esc(pair['a'])}</th>"
             f"<th>{esc(pair['b'])}</th><th>difference</th><th>{confidence:.0%} CI</th><th>p</th><th>verdict</th></tr>"]
    for key, r in pair["metrics"].items():
        verdict = ("<span class='sig'>significant</span>" if r["significant"]
                   else "<span class='ns'>not significant</span>")
        p_value = "&lt;0.001" if r["p_value"] < 0.001 else format(r["p_value"], ".3f")
        parts.append(f"<tr><td>{esc(METRIC_LABELS.get(key, key))}</td><td>{r['mean_a']:.2f}</td>"
                     f"<td>{r['mean_b']:.2f}</td>"
                     f"<td><b>{r['difference']:+.2f}</b></td><td>[{r['low']:+.2f}, {r['high']:+.2f}]</td>"
                     f"<td>{p_value}</td><td>{verdict}</td></tr>")
    return parts + ["</table>"]


def comparisons_section(pairs: list[dict], shared_ids: list[str], settings: dict) -> list[str]:
    parts = ["<h2>Is the difference real? Paired bootstrap</h2>"]
    if not pairs:
        return parts + ["<p>Only one version: nothing to compare.</p>"]
    parts.append(f"<p class='small'>On the {len(shared_ids)} samples every version shares; "
                 f"{settings['bootstrap_samples']} resamples, {settings['confidence']:.0%} percentile interval of "
                 f"the mean difference (later minus earlier). Significant = the interval excludes 0.</p>")
    for pair in pairs:
        parts += pair_table(pair, settings["confidence"])
        parts.append(f"<p>Predictions that differ: <b>{pair['differing_predictions']}</b> of {pair['samples']}.</p>")
        if pair.get("lossless_statement"):
            cls = "good" if pair["differing_predictions"] == 0 else "bad"
            parts.append(f"<p class='{cls}'>{esc(pair['lossless_statement'])}</p>")
    return parts


def charts_section(charts: dict[str, Path]) -> list[str]:
    names = ("rouge1", "rouge2", "rougeL", "distribution", "buckets")
    return ["<h2>Charts</h2>"] + [img_tag(charts[name]) for name in names if name in charts]


def buckets_section(versions: list[VersionScores]) -> list[str]:
    parts = ["<h2>Failure buckets</h2><p class='small'>Each sample gets every rule below checked; its "
             "<i>bucket</i> is the first rule (in this order) that holds, else <i>ok</i>.</p>"
             "<table><tr><th>rule</th><th>definition</th>"
             + "".join(f"<th>{esc(v.name)}<br><span class='small'>matches / first</span></th>" for v in versions)
             + "</tr>"]
    for bucket, rule in M.BUCKET_RULES.items():
        parts.append(f"<tr><td>{bucket}</td><td class='small'>{esc(rule)}</td>"
                     + "".join(f"<td>{v.summary['flag_' + bucket]} / {v.summary['bucket_' + bucket]}</td>"
                               for v in versions) + "</tr>")
    return parts + ["<tr><td>ok</td><td class='small'>no rule holds</td>"
                    + "".join(f"<td>{v.summary['bucket_ok']}</td>" for v in versions) + "</tr></table>"]


def examples_section(versions: list[VersionScores], shared_ids: list[str], examples: int) -> list[str]:
    chosen = pick_examples(versions, shared_ids, examples)
    if not chosen:
        return []
    what = ("largest ROUGE-L gains and losses of " + esc(versions[-1].name) + " over " + esc(versions[0].name)
            if len(versions) > 1 else "the first samples")
    parts = [f"<h2>Example predictions</h2><p class='small'>{what}.</p><table><tr><th>id</th><th>dialogue</th>"
             "<th>reference</th>" + "".join(f"<th>{esc(v.name)}</th>" for v in versions) + "</tr>"]
    indexed = [v.frame.set_index("id") for v in versions]
    dialogue_of = dict(zip(versions[0].source.frame["id"], versions[0].source.frame["dialogue"]))
    for sample in chosen:
        dialogue = dialogue_of.get(sample) or ""
        cells = "".join(f"<td><pre>{esc(f.at[sample, 'prediction'])}</pre><span class='small'>ROUGE-L "
                        f"{f.at[sample, 'rougeL']:.1f}; {esc(f.at[sample, 'bucket'])}</span></td>" for f in indexed)
        parts.append(f"<tr><td>{esc(sample)}</td><td><pre>{esc(dialogue[:1500])}"
                     f"{'...' if len(dialogue) > 1500 else ''}</pre></td>"
                     f"<td><pre>{esc(indexed[0].at[sample, 'reference'])}"
                     f"</pre></td>{cells}</tr>")
    return parts + ["</table>"]


def bucket_section(buckets: list[dict], settings: dict) -> list[str]:
    """Every version's means and every paired comparison within each bucket of rows."""
    if not buckets:
        return []
    parts = ["<h2>By bucket</h2><p class='small'>The same metrics and paired comparisons on each bucket's rows "
             "(BUCKETS setting).</p>"]
    keys = ("rougeL", "rouge1", "rouge2", "bertscore_f1", "check_unsupported_mentions", "check_unsupported_sentence",
            "middle_recall")
    for bucket in buckets:
        parts.append(f"<h3>{esc(bucket['bucket'])} <span class='small'>({bucket['samples']} samples)</span></h3>"
                     "<table><tr><th>version</th>" + "".join(f"<th>{esc(METRIC_LABELS.get(k, k))}</th>" for k in keys)
                     + "</tr>")
        for row in bucket["versions"]:
            parts.append(f"<tr><td>{esc(row['model'])}</td>"
                         + "".join(f"<td>{_fmt(row.get(k), 3 if k.startswith(('check_', 'middle')) else 2)}</td>"
                                   for k in keys) + "</tr>")
        parts.append("</table>")
        for pair in bucket["comparisons"]:
            parts += pair_table({**pair, "metrics": {k: v for k, v in pair["metrics"].items() if k in keys}},
                                settings["confidence"])
    return parts
