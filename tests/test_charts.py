"""Every chart the stages draw keeps its labels apart: rendered with five long version (model) names,
no two tick labels' drawn boxes overlap and none sticks out of the figure (matplotlib's renderer,
`get_window_extent`)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from conftest import REPO

NAMES = ["smollm2_lora_chunk_join_window_1024", "seed_bart_large_cnn_zero_shot", "SmolLM2-135M + LoRA (DialogSum)",
         "merged_and_cleaned_smollm2_dialogsum", "zeroshot_truncate_baseline_with_a_very_long_name"]


@pytest.fixture
def figures(monkeypatch):
    """The figures the chart functions close after saving, kept open for measuring."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for fig in kept:
        close(fig)


def versions():
    from finetuneflow.quality import faithfulness as F
    from finetuneflow.quality import metrics as M
    rng = np.random.default_rng(0)
    out = []
    for i, name in enumerate(NAMES):
        summary = {"samples": 20, "bucket_ok": 10 + i}
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            summary.update({key: 30.0 + i, f"{key}_boot_low": 28.0 + i, f"{key}_boot_high": 32.0 + i})
        summary.update({f"flag_{b}": (i + j) % 5 for j, b in enumerate(M.BUCKETS)})
        summary.update({f"faith_coverage_{s}": 1 / 3 for s in F.SEGMENTS})
        frame = pd.DataFrame({k: rng.uniform(0, 100, 20) for k in ("rouge1", "rouge2", "rougeL")})
        out.append(SimpleNamespace(name=name, summary=summary, frame=frame))
    return out


def ranking_rows():
    rows = [{"model": name, "kind": "model", "status": "ok", "samples_per_s": 0.5 * (i + 1), "pareto": i % 2 == 0,
             **{k: 20.0 + i for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}} for i, name in enumerate(NAMES)]
    return rows + [{"model": "lead-3 baseline of the dialogue", "kind": "reference", "status": "ok",
                    **{k: 15.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}}]


def draw_every_chart(out):
    from finetuneflow.plan import ranking_report
    from finetuneflow.quality import report, report_faithfulness
    from finetuneflow.train.outputs import plot_loss_curve
    sys.path.insert(0, str(REPO))
    import inspect_dataset
    vs = versions()
    report.rouge_chart(vs, "rougeL", out / "rougeL.png")
    report.bucket_chart(vs, out / "buckets.png")
    report.distribution_chart(vs, out / "score_distribution.png")
    report_faithfulness.coverage_chart(vs, out / "coverage.png")
    ranking_report.rouge_chart(ranking_rows(), out / "ranking_rouge.png")
    ranking_report.tradeoff_chart(ranking_rows(), out / "tradeoff.png")
    curve = [{"step": s, "loss": 3 / (1 + s)} for s in range(1, 200, 10)]
    evals = [{"step": s, "eval_loss": 2 / (1 + s), "rougeL": 20 + s / 20} for s in (50, 100, 150)]
    plot_loss_curve({"loss_curve": curve, "evals": evals, "best_step": 100}, out / "loss_curve.png")
    inspect_dataset.histogram(list(range(10, 3000, 7)), list(range(3, 200, 2)), out / "lengths.png")
    return 8


def test_no_chart_overlaps_its_labels(figures, tmp_path):
    from finetuneflow.quality.report import overlapping_labels
    drawn = draw_every_chart(tmp_path)
    assert len(figures) == drawn
    for fig in figures:
        names = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() if t.get_text()]
        assert overlapping_labels(fig) == [], (fig.axes[0].get_title(), names)
    assert all(p.stat().st_size > 0 for p in tmp_path.glob("*.png")) and len(list(tmp_path.glob("*.png"))) == drawn


def test_the_overlap_check_sees_an_overlap():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from finetuneflow.quality.report import overlapping_labels, wrap_label
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.bar(range(5), [1] * 5)
    ax.set_xticks(range(5))
    ax.set_xticklabels(NAMES)
    assert overlapping_labels(fig)   # the five long names unwrapped on a 4-inch chart run into each other
    plt.close(fig)
    assert wrap_label("smollm2_lora_chunk_join") == "smollm2_lora_\nchunk_join"
    assert max(len(line) for line in wrap_label("x" * 40).split("\n")) == 14
