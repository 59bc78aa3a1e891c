"""benchmark_models.py and finetuneflow/plan (baselines, scoring, benchmark, measuring): baselines,
the composite formula on known numbers, and one real run on the tiny models + lead-3 + extractive
+ a broken path."""
from __future__ import annotations

import csv
import json
import math

import pytest

from conftest import SAMPLES, error_line, files_under, run_stage
from finetuneflow.contract.errors import UserError
from finetuneflow.plan import baselines, benchmark, scoring
from finetuneflow.plan.scoring import Weights


# ----------------------------------------------------------------------------- unit tests
def test_reference_entries_are_parsed():
    assert baselines.parse_reference("lead-3", 3, 3) == ("lead", 3)
    assert baselines.parse_reference("LEAD-k", 5, 3) == ("lead", 5)
    assert baselines.parse_reference("extractive", 3, 2) == ("extractive", 2)
    assert baselines.parse_reference("extractive-4", 3, 2) == ("extractive", 4)
    for entry in ("lead", "facebook/bart-large-cnn", "leader-3", "ft_outputs/lead-3x"):
        assert baselines.parse_reference(entry, 3, 3) is None
    with pytest.raises(UserError, match="'lead-0': a baseline needs at least 1 turn"):
        benchmark.parse_entries(benchmark.BenchmarkSettings(models=["lead-0"]))


def entry(text: str) -> benchmark.Entry:
    return benchmark.parse_entries(benchmark.BenchmarkSettings(models=[text]))[0]


def test_model_entries_resolve_or_fail_clearly(tmp_path):
    assert benchmark.model_source(entry("facebook/bart-large-cnn"), "imports") == "facebook/bart-large-cnn"
    assert benchmark.model_source(entry(str(tmp_path)), "imports") == str(tmp_path)
    with pytest.raises(UserError, match="GGUF file not found"):
        benchmark.model_source(entry(str(tmp_path / "missing.gguf")), "imports")
    with pytest.raises(UserError, match="model folder not found"):
        benchmark.model_source(entry("./ft_outputs/missing"), "imports")
    taken = set()
    assert [benchmark.label_for(e, taken) for e in ("org/model", "/x/model/", "m/SmolLM2.Q4.gguf", "lead-3")] == [
        "model", "model-2", "SmolLM2.Q4", "lead-3"]
    # labels become file names: no path parts, no leading dot or dash, unique regardless of case
    assert [benchmark.label_for(e, taken) for e in ("../..", "-rf", "a/MODEL", "x/$(touch y)", "日本")] == [
        "model-3", "rf", "MODEL-4", "touch_y", "model-5"]


def test_lead_and_extractive_baselines():
    dialogue = ("Anna: Hi Tom.\nTom: Hi.\nAnna: The budget meeting moves to Friday at ten.\n"
                "Tom: Friday works, I will book the budget room.\nAnna: Great, bring the budget slides.\nTom: Bye.")
    assert baselines.lead_summary(dialogue, 2) == "Anna: Hi Tom.\nTom: Hi."
    assert baselines.lead_summary(dialogue, 2, max_words=3) == "Anna: Hi Tom."
    picked = baselines.extractive_summary(dialogue, 2).split("\n")
    turns = dialogue.split("\n")
    assert len(picked) == 2 and all("budget" in p for p in picked)
    assert [turns.index(p) for p in picked] == sorted(turns.index(p) for p in picked)   # dialogue order kept
    long_turn = "Speaker A: " + " ".join(f"We agree the remote needs a budget of {i} euros." for i in range(20))
    assert all(p.startswith("Speaker A: ") for p in baselines.extractive_summary(long_turn, 3).split("\n"))


def test_composite_follows_the_documented_formula_on_known_numbers():
    rows = [{"model": "slow-good", "kind": "model", "status": "ok", "rougeL": 30.0, "samples_per_s": 0.5},
            {"model": "fast-poor", "kind": "model", "status": "ok", "rougeL": 20.0, "samples_per_s": 8.0},
            {"model": "middle", "kind": "model", "status": "ok", "rougeL": 28.0, "samples_per_s": 2.0},
            {"model": "dominated", "kind": "model", "status": "ok", "rougeL": 25.0, "samples_per_s": 1.0},
            {"model": "lead-3", "kind": "reference", "status": "ok", "rougeL": 22.0, "samples_per_s": 1e5},
            {"model": "broken", "kind": "model", "status": "error", "error": "x"}]
    scoring.add_composite(rows, Weights(0.7, 0.3))
    by = {r["model"]: r for r in rows}
    span = math.log10(8.0) - math.log10(0.5)
    for name, rouge, speed in (("slow-good", 30, 0.5), ("fast-poor", 20, 8), ("middle", 28, 2), ("dominated", 25, 1)):
        quality, fast = (rouge - 20) / 10, (math.log10(speed) - math.log10(0.5)) / span
        assert by[name]["composite"] == pytest.approx(0.7 * quality + 0.3 * fast, abs=1e-4)
    # middle: 0.7*0.8 + 0.3*0.5 = 0.71 > slow-good 0.70 > dominated 0.7*0.5+0.3*0.25 = 0.425 > fast-poor 0.30
    ordered = scoring.order_rows(rows)
    assert [r["model"] for r in ordered] == ["middle", "slow-good", "dominated", "fast-poor", "lead-3", "broken"]
    assert [r.get("rank") for r in ordered[:4]] == [1, 2, 3, 4]
    assert {r["model"] for r in rows if r.get("pareto")} == {"slow-good", "middle", "fast-poor"}
    assert "composite" not in by["lead-3"] and "composite" not in by["broken"]
    text = scoring.explain_winner(ordered, Weights(0.7, 0.3))
    assert text.startswith("winner: middle") and "beats the best reference baseline lead-3" in text
    scoring.add_composite(rows, Weights(1.0, 0.0))   # quality only: ROUGE-L decides
    assert scoring.order_rows(rows)[0]["model"] == "slow-good"
    for quality, speed in ((0, 0), (-1, 2), (0.5, -0.1)):
        with pytest.raises(UserError, match="both must be >= 0 and not both 0"):
            Weights(quality, speed)


# ----------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def bench(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    lines = SAMPLES.read_text(encoding="utf-8").splitlines()
    data = root / "dialogues.jsonl"   # five short dialogues and the ~4,800-token meeting (longer than the models allow)
    data.write_text("\n".join(lines[:5] + [x for x in lines if '"sample-long-meeting"' in x]) + "\n", encoding="utf-8")
    models = [str(tiny_models["bart"]), str(tiny_models["llama"]), "lead-3", "extractive", str(root / "no-such-model")]
    result = run_stage("benchmark_models.py", f"--models={','.join(models)}", f"--dataset={data}",
                       "--split=all", "--n_samples=0", "--max_new_tokens=8", "--batch_size=8", "--bertscore_model=",
                       root=root)
    return root, result


def test_benchmark_writes_ranking_charts_and_predictions(bench):
    root, result = bench
    out = root / "outputs" / "benchmarks"
    assert files_under(out) == {"final_ranking.csv", "final_ranking.json", "final_ranking.html", "rouge.png",
                                "tradeoff.png", "run_config.json", "predictions/tiny-bart_predictions.csv",
                                "predictions/tiny-llama_predictions.csv", "predictions/lead-3_predictions.csv",
                                "predictions/extractive_predictions.csv"}
    rows = list(csv.DictReader(open(out / "final_ranking.csv", encoding="utf-8")))
    # models by composite, then the baselines by ROUGE-L, then the failure
    assert {(r["model"], r["kind"], r["status"]) for r in rows[2:4]} == {("extractive", "reference", "ok"),
                                                                        ("lead-3", "reference", "ok")}
    assert float(rows[2]["rougeL"]) >= float(rows[3]["rougeL"]) and rows[2]["composite"] == ""
    assert (rows[4]["model"], rows[4]["status"]) == ("no-such-model", "error")
    models = rows[:2]
    assert {r["model"] for r in models} == {"tiny-bart", "tiny-llama"} and [r["rank"] for r in models] == ["1", "2"]
    for r in models:
        assert 0 <= float(r["rougeL"]) <= 100 and float(r["samples_per_s"]) > 0 and float(r["tokens_per_s"]) > 0
        assert float(r["peak_memory_mb"]) > 0 and int(r["parameters"]) > 1000 and r["n_samples"] == "6"
        # MAX_INPUT_LENGTH 1024 is clamped to the tiny models' 512 positions (a causal model keeps room for its
        # 8 new tokens); the long meeting is cut
        assert r["max_input_length"] == ("512" if r["model"] == "tiny-bart" else "504")
        assert int(r["truncated_inputs"]) >= 1 and r["max_positions"] == "512"
        assert r["device"] == "cpu" and r["memory_kind"] == "process peak RSS" and r["pareto"] in ("True", "False")
    # the CSV's composite is the documented formula applied to its own ROUGE-L and samples/s
    q = [float(r["rougeL"]) for r in models]
    s = [math.log10(float(r["samples_per_s"])) for r in models]
    for r, qi, si in zip(models, q, s):
        quality = 1.0 if max(q) == min(q) else (qi - min(q)) / (max(q) - min(q))
        speed = 1.0 if max(s) == min(s) else (si - min(s)) / (max(s) - min(s))
        assert float(r["composite"]) == pytest.approx(0.7 * quality + 0.3 * speed, abs=1e-3)
    assert float(models[0]["composite"]) >= float(models[1]["composite"])
    broken = rows[-1]
    assert "model folder not found" in broken["error"] and "no-such-model" in broken["error"]
    assert broken["rougeL"] == "" and broken["composite"] == ""
    predictions = list(csv.DictReader(open(out / "predictions" / "lead-3_predictions.csv", encoding="utf-8")))
    assert len(predictions) == 6 and set(predictions[0]) >= {"id", "dialogue", "reference", "prediction", "rougeL"}
    assert predictions[0]["prediction"] == "\n".join(predictions[0]["dialogue"].split("\n")[:3])
    data = json.loads((out / "final_ranking.json").read_text())
    assert data["n_samples"] == 6 and len(data["rows"]) == 5 and data["winner"].startswith("winner: ")
    assert "BERTSCORE_MODEL is empty" in data["bertscore"]
    page = (out / "final_ranking.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table" in page and "tiny-llama" in page
    assert "no-such-model" in page and "Failed (1)" in page
    assert (out / "rouge.png").read_bytes()[:4] == b"\x89PNG"
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["stage"] == "benchmark_models" and run_config["config"]["N_SAMPLES"] == 0
    assert run_config["status"] == "finished" and set(run_config["files"]) == files_under(out) - {"run_config.json"}
    assert "winner: " in result.stdout and "failed: model folder not found" in result.stdout


def test_empty_models_is_one_clear_error(project):
    result = run_stage("benchmark_models.py", "--models=", f"--dataset={SAMPLES}", root=project, check=False)
    assert result.returncode == 2
    assert "MODELS is empty" in error_line(result)
    assert not (project / "outputs").exists()


REFERENCES = ("--models=lead-3,extractive", f"--dataset={SAMPLES}", "--split=all", "--n_samples=6",
              "--bertscore_model=")


def test_rerun_needs_overwrite_and_replaces_only_this_stages_files(project):
    from finetuneflow.contract.record import RunRecord, write_record
    from hostile import snapshot
    run_stage("benchmark_models.py", *REFERENCES, root=project)
    out = project / "outputs" / "benchmarks"
    (out / "train_mine.sh").write_text("echo the plan beside the ranking\n")   # recommend_finetune.py's files
    write_record(out, RunRecord("recommend_finetune", extra={"files": {"train_mine.sh": None}}),
                 name="recommend_finetune.run_config.json")
    before = snapshot(out)
    again = run_stage("benchmark_models.py", *REFERENCES, root=project, check=False)
    assert again.returncode == 2 and "pass --OVERWRITE=True to replace it" in error_line(again)
    assert snapshot(out) == before
    run_stage("benchmark_models.py", "--models=lead-2", *REFERENCES[1:], "--overwrite=True", root=project)
    assert {p for p in files_under(out) if p.startswith("predictions/")} == {"predictions/lead-2_predictions.csv"}
    after = snapshot(out)
    assert {k: after[k] for k in ("train_mine.sh", "recommend_finetune.run_config.json")} == {
        k: before[k] for k in ("train_mine.sh", "recommend_finetune.run_config.json")}
    rows = list(csv.DictReader(open(out / "final_ranking.csv", encoding="utf-8")))
    assert [r["model"] for r in rows] == ["lead-2"]


def test_split_all_scores_every_row_of_every_split_file(project):
    lines = SAMPLES.read_text(encoding="utf-8").splitlines()
    data = project / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(lines[:4]) + "\n", encoding="utf-8")
    (data / "validation.jsonl").write_text("\n".join(lines[4:7]) + "\n", encoding="utf-8")
    run_stage("benchmark_models.py", "--models=lead-3", f"--dataset={data}", "--split=all", "--n_samples=0",
              "--bertscore_model=", root=project)
    out = project / "outputs" / "benchmarks"
    predictions = list(csv.DictReader(open(out / "predictions" / "lead-3_predictions.csv", encoding="utf-8")))
    assert len(predictions) == 7
    assert json.loads((out / "final_ranking.json").read_text())["split"] == "all rows"


def test_every_entry_failing_writes_nothing(project):
    result = run_stage("benchmark_models.py", f"--models={project / 'missing-a'},{project / 'missing-b'}",
                       f"--dataset={SAMPLES}", "--n_samples=2", "--bertscore_model=", root=project, check=False)
    assert result.returncode == 2
    assert "every entry of MODELS failed (first: " in error_line(result) and "nothing was written" in error_line(result)
    assert not (project / "outputs").exists()
