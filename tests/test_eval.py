"""The two evaluation stages run as a user runs them: eval_bart_lora.py on tiny models (base and
adapter, any batch size, long inputs), eval_metrics_bart_lora.py on this project's and the
seed's CSVs, exact output file sets, and one clear error line for each kind of bad input."""
from __future__ import annotations

import csv
import json
import sys

import pytest

from conftest import REPO, SAMPLES, SHARED_DATA, error_line, files_under, needs_shared_data, run_stage

sys.path.insert(0, str(REPO))
from finetuneflow.contract.errors import UserError  # noqa: E402
from tests.adapters import make_adapter  # noqa: E402

EVAL, METRICS = "eval_bart_lora.py", "eval_metrics_bart_lora.py"
# Tiny models: a second thread only adds synchronisation (and spins badly on a busy 2-core box).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
DATA = [f"--dataset={SAMPLES}", "--split=train", "--n_samples=5"]
PRED_COLUMNS = ["id", "dialogue", "reference", "prediction", "rouge1", "rouge2", "rougeL", "rougeLsum",
                "pred_words", "ref_words"]
LEDGER = ["input_tokens", "cut_tokens", "windows"]      # the truncation ledger of every row
METRICS_FILES = {"summary_metrics.csv", "summary_metrics.json", "rouge1.png", "rouge2.png", "rougeL.png",
                 "buckets.png", "score_distribution.png", "coverage.png", "report.html", "bucket_metrics.csv",
                 "eval_metrics.run_config.json"}


def in_process(*args):
    """eval_bart_lora.main in this process (saves a start-up; outputs go to absolute paths)."""
    import torch
    from eval_bart_lora import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(list(args))
    finally:
        torch.set_num_threads(threads)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_eval_base_model_writes_predictions_and_record(tiny_models, project):
    result = run_stage(EVAL, f"--model={tiny_models['bart']}", *DATA, "--batch_size=2", "--max_input_length=128",
                       root=project, env=ONE_THREAD)
    assert files_under(project / "metrics") == {"baseline_predictions.csv", "baseline_eval.json",
                                                "baseline_run_config.json"}
    with open(project / "metrics" / "baseline_predictions.csv", newline="", encoding="utf-8") as handle:
        assert next(csv.reader(handle)) == PRED_COLUMNS + LEDGER
    rows = read_csv(project / "metrics" / "baseline_predictions.csv")
    assert len(rows) == 5 and all(0 <= float(r["rouge1"]) <= 100 for r in rows)
    cut = [r for r in rows if int(r["cut_tokens"]) > 0]
    assert cut and all(int(r["input_tokens"]) - int(r["cut_tokens"]) == 128 and r["windows"] == "1" for r in cut)
    record = json.loads((project / "metrics" / "baseline_eval.json").read_text())
    assert record["counts"]["samples"] == 5 and record["model"]["kind"] == "base"
    # the tiny BART's own generation config, since nothing overrides it
    assert record["generation"]["num_beams"] == 2 and record["generation"]["batch_size"] == 2
    assert record["generation"]["max_input_length"] == 128 and record["device"].startswith("cpu")
    assert record["timing"]["samples_per_s"] > 0 and record["timing"]["tokens_per_s"] > 0
    assert record["counts"]["truncated_inputs"] == len(record["truncated_ids"]) >= 1
    mean = sum(float(r["rougeL"]) for r in rows) / 5
    assert record["averages"]["rougeL"] == pytest.approx(mean, abs=1e-3)
    assert "ROUGE-1" in result.stdout and "samples/s" in result.stdout


def test_eval_adapter_inherits_settings_and_batch_size_does_not_matter(tiny_models, project, tmp_path):
    adapter = make_adapter(tiny_models["llama"], tmp_path / "lora",
                           generation={"num_beams": 1, "max_new_tokens": 7, "min_new_tokens": None,
                                       "no_repeat_ngram_size": None, "length_penalty": None},
                           instruction="Summarize briefly.", max_input_length=200)
    run_stage(EVAL, f"--model={adapter}", *DATA, "--batch_size=4", root=project, env=ONE_THREAD)
    in_process(f"--model={adapter}", *DATA, "--batch_size=1", "--tag=lora_b1", f"--output_dir={project / 'metrics'}")
    one, four = (read_csv(project / "metrics" / f"{tag}_predictions.csv") for tag in ("lora_b1", "lora"))
    assert [r["prediction"] for r in one] == [r["prediction"] for r in four]
    assert [r["id"] for r in one] == [r["id"] for r in four]
    record = json.loads((project / "metrics" / "lora_eval.json").read_text())
    assert record["model"]["kind"] == "adapter" and record["model"]["adapter"] == "lora"   # relative to the root
    assert record["generation"]["max_new_tokens"] == 7 and record["generation"]["max_input_length"] == 200
    assert record["generation"]["instruction"] == "Summarize briefly."
    inherited = {"NUM_BEAMS", "MAX_NEW_TOKENS", "INSTRUCTION", "MAX_INPUT_LENGTH"}
    assert set(record["inherited_from_model_record"]) >= inherited
    run_config = json.loads((project / "metrics" / "lora_run_config.json").read_text())
    assert run_config["config"]["MAX_NEW_TOKENS"] == 7 and run_config["tag"] == "lora"


def test_eval_long_input_chunk(tiny_models, project, tmp_path):
    pytest.importorskip("finetuneflow.engine.long_input")
    rows = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
    long = next(r for r in rows if r["id"] == "sample-long-meeting")
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], long)))
    common = [f"--model={tiny_models['bart']}", f"--dataset={data}", "--split=train", "--val_fraction=0",
              "--test_fraction=0", "--max_input_length=512",
              "--max_new_tokens=6", "--num_beams=1"]
    run_stage(EVAL, *common, "--long_input=chunk", "--tag=chunked", root=project, env=ONE_THREAD)
    record = json.loads((project / "metrics" / "chunked_eval.json").read_text())
    assert record["counts"]["chunked_inputs"] == 1 and record["counts"]["truncated_inputs"] == 0
    assert record["generation"]["long_input"] == "chunk"
    with pytest.raises(UserError, match="sample-long-meeting"):
        in_process(*common, "--long_input=error", "--tag=refused", f"--output_dir={project / 'metrics'}")
    assert not (project / "metrics" / "refused_predictions.csv").exists()


def test_eval_errors(tiny_models, project):
    missing = run_stage(EVAL, *DATA, root=project, check=False, env=ONE_THREAD)
    assert missing.returncode == 2 and "train_bart_lora.py" in error_line(missing)
    bad_tag = run_stage(EVAL, f"--model={tiny_models['bart']}", "--tag=../x", *DATA, root=project, check=False,
                        env=ONE_THREAD)
    assert bad_tag.returncode == 2 and "--tag" in error_line(bad_tag)
    assert not (project / "metrics").exists() or not any((project / "metrics").glob("*_predictions.csv"))


def _write_predictions(path, ids, predictions, references=None):
    rows = [{"id": i, "dialogue": f"Anna: we meet at {i}\nTom: fine",
             "reference": (references or {}).get(i, f"They meet at {i}."),
             "prediction": p, "rouge1": 0, "rouge2": 0, "rougeL": 0, "rougeLsum": 0, "pred_words": 0, "ref_words": 0}
            for i, p in zip(ids, predictions)]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=PRED_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_lineage(predictions, kind, name, lineage=None):
    """The `<tag>_eval.json` eval_bart_lora.py writes beside its predictions (model kind and lineage)."""
    record = {"model": {"kind": kind, "name": name, "adapter": name if kind == "adapter" else None,
                        "lineage": lineage or {}}}
    (predictions.parent / predictions.name.replace("_predictions.csv", "_eval.json")).write_text(json.dumps(record))


IDS = [str(i) for i in range(8)]
LORA = ["They meet at noon.", "Anna and Tom meet.", "", "They meet at 3.", "Tom: fine", "They meet at 4 with Bob.",
        "They meet at 5.", "meet meet meet meet meet"]


def test_metrics_compare_versions_and_report(project):
    metrics = project / "metrics"
    metrics.mkdir()
    _write_predictions(metrics / "baseline_predictions.csv", IDS, ["Anna: we meet at " + i for i in IDS])
    _write_predictions(metrics / "lora_predictions.csv", IDS, LORA)
    _write_predictions(metrics / "merged_predictions.csv", IDS[::-1], LORA[::-1])   # same rows, other order
    _write_lineage(metrics / "lora_predictions.csv", "adapter", "ft_outputs/lora")
    _write_lineage(metrics / "merged_predictions.csv", "merged", "ft_outputs/merged",
                   {"merged_from": "ft_outputs/lora", "cleaned_from": "ft_outputs/merged_raw"})
    result = run_stage(METRICS, "--bootstrap_samples=200", "--bertscore_model=", root=project, env=ONE_THREAD)
    assert files_under(metrics) - {f"{n}_predictions.csv" for n in ("baseline", "lora", "merged")} \
        - {"lora_eval.json", "merged_eval.json"} == \
        METRICS_FILES | {"baseline_metrics.csv", "lora_metrics.csv", "merged_metrics.csv"}
    summary = read_csv(metrics / "summary_metrics.csv")
    assert [r["model"] for r in summary] == ["baseline", "lora", "merged"]
    record = json.loads((metrics / "summary_metrics.json").read_text())
    pairs = {(p["a"], p["b"]): p for p in record["comparisons"]}
    merged = pairs[("lora", "merged")]
    assert merged["differing_predictions"] == 0 and merged["metrics"]["rougeL"]["difference"] == 0.0
    assert not merged["metrics"]["rougeL"]["significant"] and "merge is lossless" in merged["lossless_statement"]
    assert pairs[("baseline", "lora")]["differing_predictions"] == 8
    per_sample = {r["id"]: r for r in read_csv(metrics / "lora_metrics.csv")}
    assert per_sample["2"]["bucket"] == "empty" and per_sample["4"]["bucket"] == "speaker_tags"
    assert per_sample["5"]["names_not_in_dialogue"] == "Bob" and per_sample["7"]["flag_repetition"] == "True"
    assert per_sample["0"]["bucket"] == "ok"
    html = (metrics / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "src=\"http" not in html
    # faithfulness: "Bob" is in no dialogue, so sample 5's summary has an unsupported mention, marked in the report
    assert float(per_sample["5"]["check_unsupported_mentions"]) == 1.0 and "<mark" in html and "Bob</mark>" in html
    assert "Faithfulness: did the summary say something the dialogue did not?" in html
    assert record["versions"][1]["check_unsupported_mentions_rate"] > 0
    assert "not significant" in html and "merge is lossless" in html and "BERTScore" in html
    assert "merged - lora = +0.00" in result.stdout and "not significant" in result.stdout
    assert "BERTScore not computed: BERTSCORE_MODEL is empty" in result.stdout


def test_metrics_lossy_merge_is_reported(project):
    a = _write_predictions(project / "lora_predictions.csv", IDS, LORA)
    b = _write_predictions(project / "merged_predictions.csv", IDS, LORA[:-1] + ["They meet at 7."])
    # the names alone say nothing: without lineage there is no merge claim either way
    unrelated = run_stage(METRICS, f"--predictions={a},{b}", "--bootstrap_samples=100", "--bertscore_model=",
                          "--output_dir=out", root=project, env=ONE_THREAD)
    assert "merging must be lossless" not in unrelated.stdout and "lossless" not in unrelated.stdout
    _write_lineage(a, "adapter", "ft_outputs/lora")
    _write_lineage(b, "merged", "ft_outputs/merged", {"merged_from": "ft_outputs/lora"})
    result = run_stage(METRICS, f"--predictions={a},{b}", "--bootstrap_samples=100", "--bertscore_model=",
                       "--output_dir=out", root=project, env=ONE_THREAD)
    assert "differ on 1 of 8 samples: merging must be lossless" in result.stdout
    assert files_under(project / "out") == METRICS_FILES | {"lora_metrics.csv", "merged_metrics.csv"}


def test_metrics_errors(project):
    good = _write_predictions(project / "a_predictions.csv", IDS, LORA)
    other = _write_predictions(project / "b_predictions.csv", IDS[:-1] + ["99"], LORA)
    (project / "noref.csv").write_text("id,prediction\n1,hello\n")
    (project / "empty.csv").write_text("")
    cases = {"noref.csv": "has no reference column", "empty.csv": "is empty",
             f"{good},{other}": "row ids differ between a (a_predictions.csv, 8 rows) and b"}
    for arg, message in cases.items():
        result = run_stage(METRICS, f"--predictions={arg}", "--bertscore_model=", root=project, check=False,
                           env=ONE_THREAD)
        assert result.returncode == 2 and message in error_line(result), result.stderr
    none = run_stage(METRICS, root=project, check=False, env=ONE_THREAD)
    assert none.returncode == 2 and "eval_bart_lora.py" in error_line(none)
    assert not (project / "metrics").exists() or not any((project / "metrics").iterdir())


@pytest.mark.slow
@needs_shared_data
def test_metrics_reproduce_the_seed_baseline(project):
    seed = SHARED_DATA / "seed_outputs"
    result = run_stage(METRICS, f"--predictions={seed / 'baseline_predictions.csv'}", "--bootstrap_samples=100",
                       root=project, env=ONE_THREAD)
    assert "ROUGE-1 27.54  ROUGE-2 9.03  ROUGE-L 20.36" in result.stdout
    from finetuneflow.quality.encoder import find_encoder
    if find_encoder("minilm")[0] is not None:   # offline: the MiniLM fallback, labelled as such
        assert "NOT comparable with published BERTScore" in result.stdout
    else:
        assert "BERTScore not computed" in result.stdout and "local model folder" in result.stdout
    summary = read_csv(project / "metrics" / "summary_metrics.csv")[0]
    assert summary["model"] == "baseline" and summary["samples"] == "200"
