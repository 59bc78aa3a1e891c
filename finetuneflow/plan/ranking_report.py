"""The benchmark's report: final_ranking.csv/.json, the ROUGE and trade-off charts, the
self-contained HTML page, and the console table."""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from finetuneflow.contract.io import atomic_path, atomic_write_json, atomic_write_text
from finetuneflow.plan.scoring import is_candidate, is_reference

COLUMNS = ["rank", "model", "kind", "status", "rougeL", "rouge1", "rouge2", "rougeLsum", "bertscore_f1",
           "composite", "quality_norm", "speed_norm", "pareto", "samples_per_s", "tokens_per_s", "seconds",
           "load_seconds", "n_samples", "avg_pred_words", "max_input_length", "truncated_inputs", "generated_tokens",
           "peak_memory_mb", "memory_kind", "parameters", "quantizable_parameters", "family", "model_type",
           "hidden_size", "encoder_layers", "decoder_layers", "vocab_size", "max_positions", "device", "dtype",
           "entry", "source", "predictions", "error"]


REPORT_FILES = ["final_ranking.csv", "final_ranking.json", "final_ranking.html", "rouge.png", "tradeoff.png"]


def _cell(value):
    if isinstance(value, float):
        return round(value, 4)
    return "" if value is None else value


def write_tables(rows: list[dict], out_dir: Path, meta: dict) -> dict:
    """final_ranking.csv (one row per entry, COLUMNS order) and final_ranking.json (rows + run facts)."""
    import pandas as pd
    frame = pd.DataFrame([{c: _cell(r.get(c)) for c in COLUMNS} for r in rows], columns=COLUMNS)
    csv_path, json_path = out_dir / "final_ranking.csv", out_dir / "final_ranking.json"
    atomic_write_text(csv_path, frame.to_csv(index=False))
    atomic_write_json(json_path, {**meta, "rows": [{**{c: r.get(c) for c in COLUMNS},
                                                    **{k: v for k, v in r.items() if k not in COLUMNS}} for r in rows]})
    return {"csv": csv_path, "json": json_path}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def rouge_chart(rows: list[dict], path: Path) -> None:
    """Grouped bars of ROUGE-1/2/L/Lsum per successful entry; baselines hatched."""
    from finetuneflow.quality.report import fit_category_labels
    plt = _plt()
    done = [r for r in rows if r.get("status") == "ok"]
    keys = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(done) + 2), 4))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        for i, row in enumerate(done):
            ax.bar(i + (j - 1.5) * width, row[key], width, color=f"C{j}", label=key if i == 0 else None,
                   hatch="//" if row["kind"] == "reference" else None, edgecolor="white")
    ax.set_xticks(range(len(done)))
    ax.set_ylabel("F1 x 100")
    ax.set_ylim(0, 1.25 * max([r[k] for r in done for k in keys] + [1.0]))   # room for the legend
    ax.set_title("ROUGE by model (hatched: reference baselines)")
    ax.legend(ncol=4, fontsize=8)
    fit_category_labels(fig, ax, [r["model"] + (" (ref)" if r["kind"] == "reference" else "") for r in done], 10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def tradeoff_chart(rows: list[dict], path: Path) -> None:
    """ROUGE-L vs samples/s (log scale) for the models, the Pareto front as a line, baselines as dashed lines."""
    plt = _plt()
    models = [r for r in rows if is_candidate(r)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in models:
        ax.scatter(row["samples_per_s"], row["rougeL"], s=60, color="C3" if row.get("pareto") else "C0", zorder=3)
        ax.annotate(row["model"], (row["samples_per_s"], row["rougeL"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    front = sorted([r for r in models if r.get("pareto")], key=lambda r: r["samples_per_s"])
    if front:
        ax.plot([r["samples_per_s"] for r in front], [r["rougeL"] for r in front], color="C3", lw=1.5,
                drawstyle="steps-pre", label="Pareto front", zorder=2)
    for i, row in enumerate(r for r in rows if is_reference(r)):
        ax.axhline(row["rougeL"], ls="--", lw=1, color=f"C{i + 4}", label=f"{row['model']} (no model)")
    if models:
        ax.set_xscale("log")
    ax.set_xlabel("samples/s (log scale)")
    ax.set_ylabel("ROUGE-L")
    ax.set_title("Quality vs throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


HTML_COLUMNS = ["rank", "model", "kind", "rougeL", "rouge1", "rouge2", "rougeLsum", "bertscore_f1", "composite",
                "pareto", "samples_per_s", "tokens_per_s", "avg_pred_words", "peak_memory_mb", "parameters",
                "device", "predictions"]


def _html_table(rows: list[dict]) -> str:
    """The successful rows as an HTML table; every text cell escaped, predictions as links."""
    import pandas as pd
    done = [r for r in rows if r.get("status") == "ok"]
    cells = []
    for r in done:
        row = {c: _cell(r.get(c)) for c in HTML_COLUMNS}
        row.update({c: html.escape(v) for c, v in row.items() if isinstance(v, str)})
        row["parameters"] = f"{int(r['parameters']) / 1e6:,.1f}M" if r.get("parameters") else ""
        row["pareto"] = "yes" if r.get("pareto") is True else ""
        row["predictions"] = f'<a href="{html.escape(str(r["predictions"]))}">csv</a>' if r.get("predictions") else ""
        cells.append(row)
    frame = pd.DataFrame(cells, columns=HTML_COLUMNS)
    return frame.to_html(index=False, escape=False, na_rep="", float_format=lambda v: f"{v:.4g}",
                         classes="ranking", border=0)


def _html_failures(rows: list[dict]) -> str:
    failed = [r for r in rows if r.get("status") != "ok"]
    if not failed:
        return ""
    body = "".join(f"<tr><td>{html.escape(str(r['model']))}</td><td>{html.escape(str(r.get('entry', '')))}</td>"
                   f"<td>{html.escape(str(r.get('error', '')))}</td></tr>" for r in failed)
    return (f'<h2>Failed ({len(failed)})</h2><table class="ranking">'
            f"<tr><th>model</th><th>entry</th><th>error</th></tr>{body}</table>")


def write_html(rows: list[dict], path: Path, charts: list[Path], meta: dict, winner: str) -> None:
    """A self-contained page (charts embedded): the winner, the table, failed models, charts, run facts."""
    table, failed = _html_table(rows), _html_failures(rows)
    images = "".join(
        f'<figure><img alt="{html.escape(c.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(c.read_bytes()).decode()}"><figcaption>{html.escape(c.name)}</figcaption></figure>'
        for c in charts)
    facts = "".join(f"<tr><th>{html.escape(str(k))}</th><td>"
                    f"{html.escape(json.dumps(v) if isinstance(v, dict) else str(v))}</td></tr>"
                    for k, v in meta.items() if k != "winner")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>FineTuneFlow model ranking</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table.ranking {{ border-collapse: collapse; font-size: 12px; }}
table.ranking th, table.ranking td {{ padding: 4px 8px; border-bottom: 1px solid #ddd; text-align: right; }}
table.ranking td:nth-child(2), table.ranking td:nth-child(3) {{ text-align: left; }}
table.facts th {{ text-align: left; padding-right: 1em; }}
figure {{ display: inline-block; margin: 1em 1em 0 0; }} img {{ max-width: 100%; }}
.winner {{ background: #eef7ee; padding: 0.8em; border-left: 4px solid #3a3; }}
</style></head><body>
<h1>Model ranking</h1>
<p class="winner">{html.escape(winner)}</p>
<h2>Ranking</h2>
<div style="overflow-x: auto">{table}</div>
<p>Composite = {html.escape(str(meta.get('composite_formula', '')))}. Reference baselines need no model and
get no composite; they show what a model must beat.</p>
{failed}
<h2>Charts</h2>
{images}
<h2>Run</h2>
<table class="facts">{facts}</table>
</body></html>
"""
    atomic_write_text(path, page)


def console_table(rows: list[dict]) -> str:
    """The ranking as a fixed-width table for the terminal."""
    lines = [f"{'model':<28}{'ROUGE-L':>9}{'samples/s':>11}{'composite':>11}  status"]
    for r in rows:
        composite = f"{r['composite']:.3f}" if r.get("composite") is not None else "-"
        score = f"{r['rougeL']:.2f}" if r.get("rougeL") is not None else "-"
        speed = f"{r['samples_per_s']:.3g}" if r.get("samples_per_s") else "-"
        lines.append(f"{r['model'][:27]:<28}{score:>9}{speed:>11}{composite:>11}  "
                     + (r["kind"] if r["status"] == "ok" else f"error: {r['error'][:80]}"))
    return "\n".join(lines)


def write_report(rows: list[dict], out: Path, meta: dict, winner: str) -> list[str]:
    """The tables, both charts and the page (REPORT_FILES) in `out`."""
    write_tables(rows, out, meta)
    charts = [out / "rouge.png", out / "tradeoff.png"]
    rouge_chart(rows, charts[0])
    tradeoff_chart(rows, charts[1])
    write_html(rows, out / "final_ranking.html", charts, meta, winner)
    return list(REPORT_FILES)
