"""merge_bart_lora.py and post_merge_cleanup.py on tiny models with random (non-zero) LoRA adapters:
parity adapter vs merged, the model card and reports, safe re-runs, the cleaned generation config
(no warnings from a plain generate(), evaluated settings as defaults) and bad input."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import error_line, files_under, run_stage
from tests.adapters import make_adapter

import merge_bart_lora
import post_merge_cleanup
from finetuneflow.contract.errors import UserError
from finetuneflow.ship.merging import capture_warnings

SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1"}   # 2 shared cores: torch's thread pool only adds contention


@pytest.fixture(scope="module")
def bart_adapter(tiny_models, tmp_path_factory):
    return make_adapter(tiny_models["bart"], tmp_path_factory.mktemp("adapters") / "bart_lora")


@pytest.fixture(scope="module")
def bart_merged(bart_adapter, tmp_path_factory):
    """The adapter merged in process (tests that change it work on a copy)."""
    root = tmp_path_factory.mktemp("merged")
    merge_bart_lora.main([f"--adapter={bart_adapter}", f"--output_dir={root / 'merged'}", f"--metrics_dir={root}"])
    return root / "merged"


def test_merge_cleanup_bart_end_to_end(bart_adapter, project):
    merged, clean = project / "ft_outputs" / "bart_merged_highlightsum", project / "ft_outputs" / "bart_merged_clean"
    result = run_stage("merge_bart_lora.py", f"--adapter={bart_adapter}", root=project, env=SUBPROCESS_ENV)
    assert "4/4 identical greedy outputs" in result.stdout
    assert files_under(merged) == {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                                   "tokenizer_config.json", "README.md", "merge_report.json", "run_config.json"}
    report = json.loads((merged / "merge_report.json").read_text())
    assert report["passed"] and report["probes"] == 4 and report["identical_greedy_outputs"] == 4
    assert report["max_abs_logit_diff"] < 1e-4 and report["tolerance"] == 1e-3
    assert report["adapter_effect_max_abs_logit_diff"] > 0.1   # the adapter matters, so parity means something
    assert any(p["adapter"] for p in report["per_probe"])
    run_config = json.loads((merged / "run_config.json").read_text())
    assert run_config["stage"] == "merge_bart_lora" and run_config["lineage"]["merged_from"] == str(bart_adapter)
    for key in ("family", "instruction", "generation", "max_input_length"):
        assert run_config[key] == json.loads((bart_adapter / "run_config.json").read_text())[key]
    card = (merged / "README.md").read_text()
    for needle in ("base_model:", "## Training data", "LoRA: r=4, alpha=8", "## Metrics", "## Intended use",
                   "## Limits", "4/4 identical greedy summaries"):
        assert needle in card

    again = run_stage("merge_bart_lora.py", f"--adapter={bart_adapter}", root=project, env=SUBPROCESS_ENV)
    assert again.stdout.startswith("skip:") and "--OVERWRITE=True" in again.stdout

    cleaned = run_stage("post_merge_cleanup.py", root=project, env=SUBPROCESS_ENV)
    assert "verified: loads and generates with no warnings" in cleaned.stdout
    assert files_under(clean) == files_under(merged) | {"cleanup_report.json"}
    assert (clean / "model.safetensors").read_bytes() == (merged / "model.safetensors").read_bytes()
    generation = json.loads((clean / "generation_config.json").read_text())
    evaluated = run_config["generation"]
    assert {k: generation.get(k) for k in evaluated} == evaluated
    assert "max_length" not in generation and "min_length" not in generation     # max/min_new_tokens rule
    assert generation["forced_bos_token_id"] == 0 and generation["decoder_start_token_id"] == 2   # BART-cnn's kept
    cleanup = json.loads((clean / "cleanup_report.json").read_text())
    assert cleanup["verification"]["warnings"] == [] and cleanup["verification"]["plain_generate_matches_engine"]
    assert {c["key"] for c in cleanup["changes"]} >= {"max_new_tokens", "max_length", "min_length", "do_sample"}
    assert json.loads((clean / "run_config.json").read_text())["stage"] == "post_merge_cleanup"


def test_merge_and_cleanup_causal_qlora_in_process(tiny_models, tmp_path, capsys):
    adapter = make_adapter(tiny_models["llama"], tmp_path / "llama_lora", load_in_4bit=True)   # a QLoRA run
    merged, clean = tmp_path / "merged", tmp_path / "clean"
    out = merge_bart_lora.main([f"--adapter={adapter}", f"--output_dir={merged}", f"--metrics_dir={tmp_path}"])
    assert out["report"]["passed"] and out["report"]["max_abs_logit_diff"] < 1e-4
    note = capsys.readouterr().out
    assert f"trained with QLoRA on a 4-bit quantized {tiny_models['llama']}" in note
    assert "merged into the full-precision base" in (merged / "README.md").read_text()
    assert json.loads((merged / "config.json").read_text()).get("quantization_config") is None
    post_merge_cleanup.main([f"--merged_dir={merged}", f"--output_dir={clean}", "--max_new_tokens=12",
                             "--no_repeat_ngram_size=3"])
    generation = json.loads((clean / "generation_config.json").read_text())
    # transformers' no-repeat rule would count the prompt: it stays with the engine's processor
    assert "no_repeat_ngram_size" not in generation
    report = json.loads((clean / "cleanup_report.json").read_text())
    assert any(c["key"] == "no_repeat_ngram_size" and "GeneratedNoRepeatNGram" in c["why"] for c in report["changes"])
    assert json.loads((clean / "run_config.json").read_text())["generation"]["no_repeat_ngram_size"] == 3
    # stops where the engine stops (EOS + end-of-turn), pads with the tokenizer's pad, greedy, 12 new tokens
    assert generation["eos_token_id"] == [2, 0] and generation["pad_token_id"] == 2
    assert generation["num_beams"] == 1 and generation["max_new_tokens"] == 12 and generation["do_sample"] is False
    assert "forced_bos_token_id" not in generation
    assert json.loads((clean / "run_config.json").read_text())["generation"]["max_new_tokens"] == 12


def test_cleanup_repairs_a_bart_cnn_style_config(bart_merged, tmp_path):
    """A merged folder as older tools leave it: generation parameters in config.json, stale
    task_specific_params, early_stopping/length_penalty with greedy evaluated settings. Plain
    generate() warns before the cleanup and is silent after it."""
    merged = shutil.copytree(bart_merged, tmp_path / "merged")
    config = json.loads((merged / "config.json").read_text())
    config.update({"num_beams": 4, "max_length": 142, "min_length": 56, "no_repeat_ngram_size": 3,
                   "task_specific_params": {"summarization": {"num_beams": 4, "max_length": 142, "prefix": " "}}})
    (merged / "config.json").write_text(json.dumps(config))
    run_config = json.loads((merged / "run_config.json").read_text())
    run_config["generation"] = {"num_beams": 1, "max_new_tokens": 16, "min_new_tokens": None,
                                "no_repeat_ngram_size": 3, "length_penalty": None}
    (merged / "run_config.json").write_text(json.dumps(run_config))
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(merged)
    with capture_warnings() as before:
        model = AutoModelForSeq2SeqLM.from_pretrained(merged)
        model.generation_config.num_beams = 1          # what the evaluation used
        model.generate(**tokenizer("Anna: hi\nTom: hello", return_tensors="pt"), max_new_tokens=4)
    assert any("early_stopping" in w for w in before), before

    report = post_merge_cleanup.main([f"--merged_dir={merged}", f"--output_dir={tmp_path / 'clean'}"])
    changed = {(c["file"], c["key"]) for c in report["changes"]}
    assert {("config.json", "num_beams"), ("config.json", "task_specific_params"),
            ("generation_config.json", "early_stopping"), ("generation_config.json", "length_penalty")} <= changed
    clean_config = json.loads((tmp_path / "clean" / "config.json").read_text())
    assert "num_beams" not in clean_config and clean_config["task_specific_params"] == {"summarization": {"prefix": " "}}
    assert report["verification"]["warnings"] == [] and report["verification"]["plain_generate_matches_engine"]
    generation = json.loads((tmp_path / "clean" / "generation_config.json").read_text())
    assert generation["num_beams"] == 1 and "early_stopping" not in generation and "length_penalty" not in generation


def test_merge_bad_input(bart_adapter, bart_merged, tiny_models, tmp_path, project):
    merged = bart_merged
    with pytest.raises(UserError, match="already a full \\(merged\\) model"):
        merge_bart_lora.main([f"--adapter={merged}", f"--output_dir={tmp_path / 'again'}"])
    with pytest.raises(UserError, match="is a LoRA adapter, not a merged model"):
        post_merge_cleanup.main([f"--merged_dir={bart_adapter}", f"--output_dir={tmp_path / 'c'}"])
    other = make_adapter(tiny_models["bart"], tmp_path / "other_lora", seed=1)
    with pytest.raises(UserError, match="holds an earlier merge_bart_lora output; pass --OVERWRITE=True"):
        merge_bart_lora.main([f"--adapter={other}", f"--output_dir={merged}"])
    # an adapter whose base model has gone: one clear line, exit 2, nothing written
    orphan = tmp_path / "orphan"
    shutil.copytree(bart_adapter, orphan)
    run_config = json.loads((orphan / "run_config.json").read_text())
    run_config["lineage"]["base_model"] = str(tmp_path / "deleted-base")
    (orphan / "run_config.json").write_text(json.dumps(run_config))
    result = run_stage("merge_bart_lora.py", f"--adapter={orphan}", root=project, check=False, env=SUBPROCESS_ENV)
    assert result.returncode == 2 and "deleted-base" in error_line(result) and "not found" in error_line(result)
    assert not (project / "ft_outputs").exists()
