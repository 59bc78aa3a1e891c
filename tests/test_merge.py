"""merge_bart_lora.py and post_merge_cleanup.py on tiny models with random (non-zero) LoRA adapters:
parity adapter vs merged, the model card and reports, safe re-runs, the cleaned generation config
(no warnings from a plain generate(), evaluated settings as defaults) and bad input."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import SAMPLES, error_line, files_under, run_stage
from tests.adapters import make_adapter

import merge_bart_lora
import post_merge_cleanup
from finetuneflow.contract.errors import UserError
from finetuneflow.ship.cleanup import capture_warnings

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
    assert "summaries identical 4/4 -> PASS" in result.stdout
    assert files_under(merged) == {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                                   "tokenizer_config.json", "README.md", "merge_report.json", "run_config.json"}
    report = json.loads((merged / "merge_report.json").read_text())
    # the one parity report schema: measured / thresholds / passed / failures / probes
    assert report["check"] == "merge" and report["key"] == "float32" and report["passed"] and report["failures"] == []
    measured = report["measured"]
    assert measured["summaries_identical"] == measured["summaries_compared"] == 4 and len(report["probes"]) == 4
    assert measured["max_abs"] < 1e-4 and report["thresholds"] == {"max_abs": 1e-3, "min_identical_summaries": 1.0}
    assert measured["positions"] > 4 and measured["argmax_agreement"] == 1.0
    assert report["adapter_effect_max_abs"] > 0.1   # the adapter matters, so parity means something
    assert all(p["adapter"] == p["merged"] and p["identical"] and p["max_abs"] < 1e-4 for p in report["probes"])
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
    verification = cleanup["verification"]
    assert verification["warnings"] == [] and verification["passed"] and verification["check"] == "cleanup"
    assert verification["measured"]["identical_summaries"] == 1.0      # plain generate() == the engine
    assert verification["measured"]["max_abs"] == 0.0                  # same weights, same logits
    assert {c["key"] for c in cleanup["changes"]} >= {"max_new_tokens", "max_length", "min_length", "do_sample"}
    assert json.loads((clean / "run_config.json").read_text())["stage"] == "post_merge_cleanup"
    # re-runnable like merge and training: the same command on its own finished output has nothing to do
    before = {name: (clean / name).stat().st_mtime_ns for name in files_under(clean)}
    again = run_stage("post_merge_cleanup.py", root=project, env=SUBPROCESS_ENV)
    assert f"skip: {clean} already holds the cleanup of {merged} with these settings" in again.stdout
    assert {name: (clean / name).stat().st_mtime_ns for name in files_under(clean)} == before
    changed = run_stage("post_merge_cleanup.py", "--max_new_tokens=5", root=project, check=False, env=SUBPROCESS_ENV)
    assert changed.returncode == 2 and "holds an earlier post_merge_cleanup output" in error_line(changed)


def test_merge_and_cleanup_causal_qlora_in_process(tiny_models, tmp_path, capsys):
    adapter = make_adapter(tiny_models["llama"], tmp_path / "llama_lora", load_in_4bit=True)   # a QLoRA run
    merged, clean = tmp_path / "merged", tmp_path / "clean"
    out = merge_bart_lora.main([f"--adapter={adapter}", f"--output_dir={merged}", f"--metrics_dir={tmp_path}"])
    assert out["report"]["passed"] and out["report"]["measured"]["max_abs"] < 1e-4
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
    # make demo's re-run: both stages replace their own earlier output with --overwrite=True
    again = merge_bart_lora.main([f"--adapter={adapter}", f"--output_dir={merged}", f"--metrics_dir={tmp_path}",
                                  "--overwrite=True"])
    assert again["skipped"] is False and again["report"]["passed"]
    post_merge_cleanup.main([f"--model={merged}", f"--output_dir={clean}", "--max_new_tokens=12", "--overwrite=True"])
    assert json.loads((clean / "run_config.json").read_text())["lineage"]["cleaned_from"] == str(merged)


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
    assert "num_beams" not in clean_config
    assert clean_config["task_specific_params"] == {"summarization": {"prefix": " "}}
    assert report["verification"]["warnings"] == [] and report["verification"]["passed"]
    generation = json.loads((tmp_path / "clean" / "generation_config.json").read_text())
    assert generation["num_beams"] == 1 and "early_stopping" not in generation and "length_penalty" not in generation


def test_merge_bad_input(bart_adapter, bart_merged, tiny_models, tmp_path, project):
    merged = bart_merged
    with pytest.raises(UserError, match="already a full \\(merged\\) model"):
        merge_bart_lora.main([f"--adapter={merged}", f"--output_dir={tmp_path / 'again'}"])
    with pytest.raises(UserError, match="is a LoRA adapter folder, not a merged model"):
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


def test_merge_probes_the_users_own_csv_with_its_recorded_columns(tiny_models, project):
    """An adapter trained on a CSV with the user's own column names (`conversation`, `notes`) and its own
    split settings: with PARITY_DATASET left at None the merge reads that CSV the way training did."""
    import csv
    rows = [json.loads(line) for line in SAMPLES.read_text().splitlines()]
    data = project / "data" / "my_dialogues.csv"
    data.parent.mkdir(parents=True)
    with open(data, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["conversation", "notes"], *([r["dialogue"], r["summary"]] for r in rows)])
    adapter = make_adapter(tiny_models["bart"], project / "ft_outputs" / "my_lora", dataset="data/my_dialogues.csv")
    record = json.loads((adapter / "run_config.json").read_text())
    record["split"].update(columns={"dialogue": "conversation", "summary": "notes", "id": None}, seed=7,
                           val_fraction=0.1, test_fraction=0.2)
    (adapter / "run_config.json").write_text(json.dumps(record))
    run_stage("merge_bart_lora.py", "--adapter=ft_outputs/my_lora", "--output_dir=ft_outputs/my_merged",
              "--parity_samples=2", root=project, env=SUBPROCESS_ENV)
    report = json.loads((project / "ft_outputs" / "my_merged" / "merge_report.json").read_text())
    assert report["passed"] and report["probe_source"] == "data/my_dialogues.csv" and len(report["probes"]) == 2


def test_merge_refuses_an_adapter_that_changes_nothing(tiny_models, tmp_path):
    """LoRA B = 0 (untrained, or weights that did not fit the base): parity would pass on a no-op,
    so the merge is refused and nothing is written."""
    adapter = make_adapter(tiny_models["llama"], tmp_path / "zero_lora", strength=0.0)
    with pytest.raises(UserError, match="does not change .* outputs at all .*Nothing was written"):
        merge_bart_lora.main([f"--adapter={adapter}", f"--output_dir={tmp_path / 'merged'}"])
    assert not (tmp_path / "merged").exists()


def test_the_model_card_quotes_evaluations_through_their_records(bart_adapter, tiny_models, tmp_path):
    """Only finished eval records about this adapter or its base are quoted; a JSON file that merely
    contains "rouge" keys, an unfinished run and another model's evaluation are not."""
    from finetuneflow.contract.record import RunRecord, write_record
    from finetuneflow.ship.model_card import evaluations
    metrics = tmp_path / "metrics"
    base = str(tiny_models["bart"])

    def evaluation(tag, model, status="finished", rouge_l=30.0):
        write_record(metrics, RunRecord("eval", extra={"tag": tag, "status": status}), {}, [],
                     name=f"{tag}_run_config.json")
        (metrics / f"{tag}_eval.json").write_text(json.dumps({
            "tag": tag, "samples": 10, "model": model, "dataset": {"source": "data/x.jsonl", "split": "test"},
            "averages": {"rouge1": 40.0, "rouge2": 12.5, "rougeL": rouge_l, "rougeLsum": 31.0}}))

    evaluation("lora", {"name": str(bart_adapter), "base": base, "adapter": str(bart_adapter)}, rouge_l=30.79)
    evaluation("baseline", {"name": base, "base": base, "adapter": None}, rouge_l=19.39)
    evaluation("other", {"name": "ft_outputs/someone_else", "base": "gpt2", "adapter": None}, rouge_l=55.5)
    evaluation("half", {"name": str(bart_adapter), "adapter": str(bart_adapter)}, status="started", rouge_l=77.7)
    (metrics / "notes_eval.json").write_text(json.dumps({"rougeL": 99.9}))     # no record: not an evaluation
    found, skipped = evaluations(metrics, bart_adapter, base)
    assert {(e.tag, e.about) for e in found} == {("lora", "this adapter"),
                                                 ("baseline", "the base model (zero-shot)")}
    assert skipped == 2
    line = next(e for e in found if e.tag == "lora").line()
    assert line == "- this adapter (`lora`): ROUGE-1 40.00, ROUGE-2 12.50, ROUGE-L 30.79, ROUGE-Lsum 31.00 on 10 " \
                   "rows of test split of data/x.jsonl"


def test_the_parity_toolkit_judges_only_real_measurements():
    import numpy as np
    from finetuneflow.ship import parity
    same = [np.ones((3, 5)), np.zeros((2, 5))]
    measured = parity.compare(same, [a.copy() for a in same])
    assert measured == {"quantity": "logits", "max_abs": 0.0, "mean_abs": 0.0, "positions": 5,
                        "per_probe_max_abs": [0.0, 0.0], "argmax_agreement": 1.0}
    shifted = parity.compare([np.array([[0.0, 1.0]])], [np.array([[0.5, 0.2]])])
    assert shifted["max_abs"] == 0.8 and shifted["argmax_agreement"] == 0.0
    thresholds = parity.thresholds_for("gguf", "q8_0")
    assert parity.judge({**measured}, thresholds) == []
    # zero probes: nothing was verified, so nothing passes
    empty = parity.compare([], [])
    assert "no probe tokens were compared: nothing was verified" in parity.judge(empty, thresholds)
    # NaN logits (a broken merge) never pass a "max_abs <= limit" check
    nan = parity.compare([np.array([[np.nan, 1.0]])], [np.array([[0.0, 1.0]])])
    assert any("not a finite measurement" in f for f in parity.judge(nan, parity.thresholds_for("merge", "float32")))
    report = parity.report("merge", "float32", measured, [{"id": "a"}, {"id": "b"}])
    assert not report.passed and report.failures == ["identical_summaries is None (not a finite measurement)"]
    assert parity.thresholds_for("import", "float32", {"max_abs": 0.5, "other": None}) == {"max_abs": 0.5}
    with pytest.raises(UserError, match="no ct2 parity thresholds for 'int4'"):
        parity.thresholds_for("ct2", "int4")
