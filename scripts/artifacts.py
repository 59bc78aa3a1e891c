"""Print where every stage's artifacts are and the numbers that matter (the end of `make demo`).

Run as: python scripts/artifacts.py
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetuneflow.contract.paths import ROOT  # noqa: E402


def size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return f"{total / 1e6:,.1f} MB" if total >= 1e5 else f"{total / 1e3:,.1f} kB"


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    print(f"{'artifact':<58} {'size':>10}")
    for folder in ("ft_outputs", "metrics", "outputs/benchmarks"):
        base = ROOT / folder
        if not base.is_dir():
            continue
        for item in sorted(base.iterdir()):
            if item.name.startswith(".") or item.name in ("tiny", "imported"):
                continue
            print(f"{str(item.relative_to(ROOT)) + ('/' if item.is_dir() else ''):<58} {size(item):>10}")
    print("\nkey numbers")
    ranking = ROOT / "outputs/benchmarks/final_ranking.csv"
    if ranking.is_file():
        for row in csv.DictReader(ranking.open()):
            if row.get("rougeL"):
                print(f"  benchmark  {row.get('model', '?'):<40} ROUGE-L {float(row['rougeL']):6.2f}")
    summary = ROOT / "metrics/summary_metrics.csv"
    if summary.is_file():
        for row in csv.DictReader(summary.open()):
            print(f"  eval       {row['model']:<40} ROUGE-1/2/L {float(row['rouge1']):.2f} / "
                  f"{float(row['rouge2']):.2f} / {float(row['rougeL']):.2f}")
    for report in sorted((ROOT / "ft_outputs").glob("*/merge_report.json")):
        m = load(report).get("measured") or {}
        print(f"  merge      {report.parent.name:<40} {m.get('summaries_identical')}/{m.get('summaries_compared')} "
              f"identical, max |logit diff| {m.get('max_abs') or 0:.1e}")
    for report in sorted((ROOT / "ft_outputs").glob("**/*export_report.json")):
        verification = load(report).get("verification") or {}
        checks = verification.get("checks") or {}
        agreement = ((checks.get("transformers") or {}).get("measured") or {}).get("argmax_agreement")
        print(f"  export     {report.name.replace('.export_report.json', ''):<40} passed {verification.get('passed')}"
              + (f", argmax agreement {agreement:.1%}" if agreement is not None else ""))
    from finetuneflow.ship.gate_report import console_lines
    for report in sorted((ROOT / "ft_outputs").glob("**/*.deploy_report.json")):
        print("\n" + "\n".join(console_lines(load(report))))    # with OUTTYPE=auto's choice


if __name__ == "__main__":
    main()
