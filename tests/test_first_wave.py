"""A project made by the first wave (tests/fixtures/first_wave, see its README) still works as
input to every later stage: its run records (flat keys, absolute paths, no schema_version) load
through the typed record, and each stage runs on its folders as a user would."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import REPO, SAMPLES, run_stage

FIXTURE = REPO / "tests" / "fixtures" / "first_wave"
OLD_ROOT = "/tmp/fwroot"


@pytest.fixture(scope="module")
def old_project(tmp_path_factory) -> Path:
    """The first-wave project copied to a temp root, its absolute paths pointing there."""
    root = tmp_path_factory.mktemp("first_wave")
    shutil.copytree(FIXTURE, root, dirs_exist_ok=True)
    (root / "README.md").unlink()
    (root / "data" / "samples").mkdir(parents=True)
    shutil.copy(SAMPLES, root / "data" / "samples" / "dialogues.jsonl")
    for path in root.rglob("*.json"):
        text = path.read_text(encoding="utf-8")
        if OLD_ROOT in text:
            path.write_text(text.replace(OLD_ROOT, str(root)), encoding="utf-8")
    return root


def test_old_records_load_as_typed_records(old_project):
    from finetuneflow.contract.record import read_record
    adapter = read_record(old_project / "ft_outputs/old_lora")
    merged = read_record(old_project / "ft_outputs/old_merged")
    clean = read_record(old_project / "ft_outputs/old_clean")
    assert adapter.schema_version == merged.schema_version == clean.schema_version == 1
    assert adapter.lineage.base_model == str(old_project / "models/tiny-llama")
    assert merged.lineage.merged_from == str(old_project / "ft_outputs/old_lora")
    assert clean.lineage.cleaned_from == str(old_project / "ft_outputs/old_merged")
    assert adapter.generation.max_new_tokens == clean.generation.max_new_tokens == 16
    assert adapter.split.seed == 42 and adapter.split.train_samples == 8


def test_train_recognizes_its_finished_first_wave_run(old_project):
    """Same command as the first wave (old flag names): nothing to do, not 'other settings'."""
    result = run_stage("train_bart_lora.py", f"--model_name={old_project}/models/tiny-llama",
                       "--dataset=data/samples/dialogues.jsonl", "--train_samples=8", "--val_samples=2",
                       "--max_steps=2", "--eval_steps=1", "--batch_size=2", "--grad_accum=1",
                       "--max_input_length=256", "--max_target_length=32", "--num_beams=1", "--max_new_tokens=16",
                       "--learning_rate=1e-3", "--no_repeat_ngram_size=3", "--length_penalty=1.0",
                       "--output_dir=ft_outputs/old_lora", root=old_project)
    assert "already holds a finished run with these settings" in result.stdout
    assert "note: --MODEL_NAME is now --MODEL" in result.stderr


def test_eval_inherits_from_an_old_adapter_and_refuses_its_training_rows(old_project):
    result = run_stage("eval_bart_lora.py", "--model=ft_outputs/old_lora", "--dataset=data/samples/dialogues.jsonl",
                       "--split=test", "--n_samples=3", "--tag=old", root=old_project)
    record = json.loads((old_project / "metrics/old_eval.json").read_text())
    assert record["generation"]["max_new_tokens"] == 16 and record["generation"]["no_repeat_ngram_size"] == 3
    assert "MAX_INPUT_LENGTH" in record["inherited_from_model_record"] and record["training_overlap"]["rows"] == 0
    assert "inherited from the model's run record" in result.stdout
    refused = run_stage("eval_bart_lora.py", "--model=ft_outputs/old_lora", "--dataset=data/samples/dialogues.jsonl",
                        "--split=train", "--n_samples=0", "--tag=old_train", root=old_project, check=False)
    assert refused.returncode == 2 and "rows ft_outputs/old_lora was trained on" in refused.stderr


def test_merge_cleanup_inference_and_export_read_old_folders(old_project):
    run_stage("merge_bart_lora.py", "--adapter=ft_outputs/old_lora", "--output_dir=ft_outputs/new_merged",
              root=old_project)
    run_stage("post_merge_cleanup.py", "--merged_dir=ft_outputs/old_merged", "--output_dir=ft_outputs/new_clean",
              root=old_project)
    out = run_stage("inference_bart_lora.py", "--model=ft_outputs/old_clean", "--text=Anna: Lunch at noon?\nTom: Sure.",
                    root=old_project)
    assert out.stdout.strip()
    run_stage("export_gguf.py", "--model=ft_outputs/old_clean", "--format=ct2", "--quantization=float32",
              "--output_dir=ft_outputs/old_ct2", root=old_project)
    ct2 = json.loads((old_project / "ft_outputs/old_ct2/run_config.json").read_text())
    assert ct2["generation"]["max_new_tokens"] == 16 and ct2["lineage"]["exported_from"] == "ft_outputs/old_clean"


def test_eval_metrics_reads_old_predictions(old_project):
    run_stage("eval_metrics_bart_lora.py", "--predictions=metrics/lora_predictions.csv", "--bertscore_model=",
              "--output_dir=metrics/compare_old", root=old_project)
    summary = json.loads((old_project / "metrics/compare_old/summary_metrics.json").read_text())
    assert summary["versions"][0]["samples"] == 3


def test_the_server_serves_an_old_clean_folder(old_project, monkeypatch):
    from fastapi.testclient import TestClient
    monkeypatch.setenv("FTF_ROOT", str(old_project))
    sys.path.insert(0, str(REPO))
    import serve_api
    from finetuneflow.serve.inference_io import inherit_defaults, load_for_inference
    cfg = serve_api.configure(vars(serve_api), [f"--model={old_project}/ft_outputs/old_clean"])
    loaded = load_for_inference(cfg.MODEL, None, "cpu")
    inherit_defaults(cfg, loaded)
    with TestClient(serve_api.create_app(loaded, cfg)) as client:
        response = client.post("/summarize", json={"dialogue": "Anna: Lunch?\nTom: Sure."})
    assert response.status_code == 200 and response.json()["summaries"][0]
