"""Records readable from any root: a run under FTF_ROOT=<elsewhere> whose base model lies in the code
folder (the repository) trains, then merges, evaluates and exports with the same FTF_ROOT. A path is
stored relative to FTF_ROOT only when it lies under it, else absolute; records written by earlier
versions (a path relative to the code folder) still read."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, SAMPLES, run_stage
from finetuneflow.contract.record import portable

TRAIN = [f"--dataset={SAMPLES}", "--train_samples=8", "--val_samples=2", "--max_steps=1", "--eval_on_start=False",
         "--max_input_length=192", "--max_target_length=32", "--max_new_tokens=6", "--num_beams=1"]
EVAL = [f"--dataset={SAMPLES}", "--split=test", "--n_samples=2", "--batch_size=2", "--wandb=False"]


@pytest.fixture
def base_in_code_folder():
    """A tiny BART built into a temporary folder inside the repository, removed afterwards."""
    from finetuneflow.model.tiny import build_tiny_bart
    folder = Path(tempfile.mkdtemp(prefix=".tmp_base_", dir=REPO))
    try:
        yield build_tiny_bart(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_portable_is_relative_to_ftf_root_only(tmp_path):
    from finetuneflow.contract.paths import CODE_ROOT, ROOT
    assert portable(ROOT / "ft_outputs" / "x") == str(Path("ft_outputs") / "x")
    assert portable("ft_outputs/x") == "ft_outputs/x" and portable("facebook/bart-large-cnn") == \
        "facebook/bart-large-cnn"
    outside = tmp_path / "elsewhere" / "model"
    assert portable(outside) == str(outside)   # absolute, never relative to another anchor
    if ROOT != CODE_ROOT:
        assert portable(CODE_ROOT / "README.md") == str(CODE_ROOT / "README.md")


@pytest.mark.slow
def test_train_merge_evaluate_export_under_another_root_with_the_base_in_the_code_folder(base_in_code_folder,
                                                                                         project):
    run_stage("train_bart_lora.py", f"--model={base_in_code_folder}", "--output_dir=ft_outputs/lora", *TRAIN,
              root=project)
    record = json.loads((project / "ft_outputs" / "lora" / "run_config.json").read_text())
    assert record["lineage"]["base_model"] == str(base_in_code_folder)   # outside FTF_ROOT: absolute
    assert record["lineage"]["adapter"] == "ft_outputs/lora"             # under FTF_ROOT: relative to it
    run_stage("eval_bart_lora.py", "--model=ft_outputs/lora", "--tag=lora", *EVAL, root=project)
    run_stage("merge_bart_lora.py", "--adapter=ft_outputs/lora", "--output_dir=ft_outputs/merged",
              "--parity_samples=1", "--parity_new_tokens=4", root=project)
    run_stage("eval_bart_lora.py", "--model=ft_outputs/merged", "--tag=merged", *EVAL, root=project)
    run_stage("export_gguf.py", "--model=ft_outputs/merged", "--format=ct2", "--quantization=float32",
              "--n_probes=1", "--gate=off", root=project)
    assert (project / "metrics" / "lora_eval.json").is_file() and (project / "metrics" / "merged_eval.json").is_file()
    assert any((project / "ft_outputs" / "ct2").rglob("model.bin"))

    # a record written before this rule stored the base relative to the code folder: it still reads
    adapter_record = project / "ft_outputs" / "lora" / "run_config.json"
    old = json.loads(adapter_record.read_text())
    old["lineage"]["base_model"] = str(Path(base_in_code_folder).relative_to(REPO))
    adapter_record.write_text(json.dumps(old))
    run_stage("merge_bart_lora.py", "--adapter=ft_outputs/lora", "--output_dir=ft_outputs/merged2",
              "--parity_samples=1", "--parity_new_tokens=4", root=project)
    merged2 = json.loads((project / "ft_outputs" / "merged2" / "run_config.json").read_text())
    assert merged2["lineage"]["base_model"] == str(base_in_code_folder)   # rewritten the current way
