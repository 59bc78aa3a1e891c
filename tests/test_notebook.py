"""The Colab notebook (notebooks/finetuneflow_colab.ipynb): committed without outputs, its `!python`
cells in stage order with flags the stages declare, and executed end to end with nbclient on a CPU,
offline, with the tiny BART instead of bart-large-cnn and the bundled samples instead of HighlightSum:
a cell injected after the `parameters` cell overrides it (as papermill does)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from conftest import OFFLINE_ENV
from doc_blocks import REPO, SAMPLES, flag_problems

NOTEBOOK = REPO / "notebooks" / "finetuneflow_colab.ipynb"
STAGE_ORDER = ["inspect_dataset.py", "benchmark_models.py", "recommend_finetune.py", "bash {SCRIPT}",
               "eval_bart_lora.py", "eval_metrics_bart_lora.py", "merge_bart_lora.py", "post_merge_cleanup.py",
               "export_gguf.py", "inference_bart_lora.py"]

nbformat = pytest.importorskip("nbformat")


def code_cells():
    return [c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]


def test_committed_without_outputs():
    for i, cell in enumerate(code_cells()):
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, \
            f"code cell {i} carries outputs or an execution count: clear them before committing"


def test_one_parameter_cell_at_the_top():
    cells = code_cells()
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged == [0], f"the first code cell, and only it, is tagged `parameters` (found {tagged})"
    names = re.findall(r"^([A-Z_]+(?:, [A-Z_]+)*) =", cells[0].source, flags=re.M)
    assert {"MODEL", "DATASET", "OUTPUT_DIR"} <= {n for group in names for n in group.split(", ")}


def test_stages_in_order_with_known_flags():
    source = "\n".join(c.source for c in code_cells())
    positions = [source.find(stage) for stage in STAGE_ORDER]
    assert -1 not in positions and positions == sorted(positions), dict(zip(STAGE_ORDER, positions))
    assert flag_problems([(f"{NOTEBOOK.name} cell {i}", c.source) for i, c in enumerate(code_cells())]) == []
    assert re.search(r"eval_bart_lora\.py --model=\{ADAPTER\}[^\n]*--split=test", source), \
        "the fine-tuned model is evaluated on the test split"


@pytest.mark.slow
def test_runs_on_cpu_with_tiny_models(tiny_models, tmp_path, monkeypatch):
    from nbclient import NotebookClient
    bart = tiny_models["bart"]
    out = tmp_path / "drive"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    # `!python` is this interpreter; the plan's script finds `accelerate` beside it.
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    for key, value in {**OFFLINE_ENV, "PATH": path}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("FTF_ROOT", raising=False)
    overrides = (f"CODE_DIR = {str(REPO)!r}\nOUTPUT_DIR = {str(out)!r}\nINSTALL = False\n"
                 f"MODEL = {str(bart)!r}\nDATASET = {str(SAMPLES)!r}\n"
                 "TRAIN_SAMPLES, VAL_SAMPLES, BENCHMARK_SAMPLES, TEST_SAMPLES, GATE_SAMPLES = 0, 4, 4, 0, 4\n"
                 'TRAIN_FLAGS = "--max_steps=4 --eval_steps=2 --max_input_length=256 --max_target_length=64"\n')
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(first + 1, nbformat.v4.new_code_cell(overrides, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=False,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "error:" not in text, text[-4000:]
    for tag in ("zeroshot", "lora", "merged"):
        assert (out / "metrics" / f"{tag}_eval.json").is_file(), text[-4000:]
    assert (out / "metrics" / "report.html").is_file()
    assert (out / "ft_outputs" / "ct2" / "bart_merged_clean-int8" / "model.bin").is_file()
