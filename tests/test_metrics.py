"""Metrics against hand-computed values, every failure-bucket rule, the paired bootstrap, and
reading prediction CSVs in both formats (with their error messages)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from finetuneflow.quality import metrics as M
from finetuneflow.contract.errors import UserError
from finetuneflow.quality.predictions import COLUMNS, check_same_samples, read_predictions, write_predictions


# --- sentences and ROUGE --------------------------------------------------------------------------
def test_split_sentences_keeps_abbreviations_and_initials_together():
    assert M.split_sentences("Mr. Smith met Dr. Jones. They talked.") == "Mr. Smith met Dr. Jones.\nThey talked."
    assert M.split_sentences("J. K. Rowling wrote it. Fans loved it!") == "J. K. Rowling wrote it.\nFans loved it!"
    assert M.split_sentences("Bring fruit, e.g. Apples. OK?") == "Bring fruit, e.g. Apples.\nOK?"
    assert M.split_sentences("Hi there. #Person1# asks.\nSecond line") == "Hi there.\n#Person1# asks.\nSecond line"
    assert M.split_sentences("  ") == ""


def test_rouge_hand_computed():
    # pred 3 unigrams all in the 6-unigram reference: P=1, R=1/2 -> F=2/3; bigrams P=2/2, R=2/5 -> F=4/7
    row = M.rouge_per_sample(["the cat sat"], ["the cat sat on the mat"])[0]
    assert row["rouge1"] == pytest.approx(200 / 3)
    assert row["rouge2"] == pytest.approx(400 / 7)
    assert row["rougeL"] == pytest.approx(200 / 3) and row["rougeLsum"] == pytest.approx(200 / 3)
    # stemming: "cats running" == "cat run"
    assert M.rouge_per_sample(["cats running"], ["cat run"])[0]["rouge1"] == pytest.approx(100)
    # Lsum works per sentence: the union LCS over two reference sentences
    lsum = M.rouge_per_sample(["b a. d c."], ["a b. c d."])[0]
    assert lsum["rougeL"] == pytest.approx(50) and lsum["rougeLsum"] == pytest.approx(50)
    assert M.mean_scores([{"rouge1": 10.0}, {"rouge1": 20.0}], ("rouge1",)) == {"rouge1": 15.0}
    with pytest.raises(ValueError):
        M.rouge_per_sample(["a"], [])


def test_rouge_bootstrap_is_seeded_and_brackets_the_mean():
    preds = ["the cat sat", "a dog ran far", "hello", "we met at noon"]
    refs = ["the cat sat on the mat", "the dog ran", "hello world", "we met at noon today"]
    raw = M.rouge_scores(preds, refs)
    first, again = M.rouge_bootstrap(raw, 200, seed=1), M.rouge_bootstrap(raw, 200, seed=1)
    assert first == again
    mean = M.mean_scores(M.rouge_f1(raw))
    for key in M.ROUGE_KEYS:
        assert first[key]["low"] <= first[key]["mid"] <= first[key]["high"]
        assert first[key]["low"] <= mean[key] <= first[key]["high"]
    same = M.rouge_bootstrap(M.rouge_scores(["a b"] * 3, ["a b c d"] * 3), 50)
    assert same["rouge1"]["low"] == same["rouge1"]["high"] == pytest.approx(200 / 3)
    state = np.random.get_state()[1].copy()
    M.rouge_bootstrap(raw, 10)
    assert (np.random.get_state()[1] == state).all()   # the global generator is restored


# --- BLEU / chrF / lengths ------------------------------------------------------------------------
def test_sacrebleu_corpus_scores_and_signatures():
    scores = M.corpus_bleu_chrf(["the cat sat on the mat"], ["the cat sat on a mat"])
    # precisions 5/6, 3/5, 2/4, 1/3, brevity penalty 1: BLEU = (5/6*3/5*1/2*1/3) ** (1/4)
    assert scores["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25, abs=0.01)
    assert "tok:13a" in scores["bleu_signature"] and "nc:6" in scores["chrf_signature"]
    perfect = M.corpus_bleu_chrf(["a quick brown fox jumps"], ["a quick brown fox jumps"])
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)
    rows = M.sentence_bleu_chrf(["a quick brown fox jumps", "zzz"], ["a quick brown fox jumps", "a b c"])
    assert rows[0] == {"bleu": pytest.approx(100), "chrf": pytest.approx(100)} and rows[1]["chrf"] < 5


def test_length_rows_and_summary():
    row = M.length_row("one two three", "one two three four five six", "a b c d e f g h i j k l")
    assert row == {"pred_words": 3, "ref_words": 6, "dialogue_words": 12, "len_ratio": 0.5, "compression": 0.25}
    assert M.length_row("x", "y", None)["compression"] is None
    summary = M.length_summary([row, M.length_row("a", "b c", None)])
    assert summary["pred_words"] == {"mean": 2.0, "median": 2.0}
    assert summary["compression"] == {"mean": 0.25, "median": 0.25}


# --- BERTScore ------------------------------------------------------------------------------------
def test_bertscore_says_why_not(monkeypatch):
    off = M.bertscore(["a"], ["a"], "")
    assert not off.computed and "switched off" in off.note and off.mean is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = M.bertscore(["a"], ["a"], "roberta-large")
    assert not offline.computed and "HF_HUB_OFFLINE" in offline.note and "local model folder" in offline.note


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory, tiny_models):
    """A tiny random RoBERTa saved twice: under its own name and as a folder named
    `roberta-large` (bert-score ships a rescale baseline for that name)."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["bart"])
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bertscore")
    folders = {}
    for name, layers in (("tiny-roberta", 2), ("roberta-large", 17)):   # bert-score uses layer 17 of roberta-large
        config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=layers,
                               num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=520, pad_token_id=tokenizer.pad_token_id)
        RobertaModel(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def test_bertscore_with_a_local_model(tiny_roberta):
    result = M.bertscore(["the cat sat on the mat", "hello there", ""],
                         ["the cat sat on the mat", "general remarks", "x"], str(tiny_roberta["tiny-roberta"]))
    assert result.computed and not result.rescaled and "NOT rescaled" in result.note
    assert result.f1[0] == pytest.approx(100, abs=1e-3) and 0 < result.f1[1] < 100
    assert result.f1[2] == 0.0 and "1 empty predictions scored 0" in result.note
    assert result.num_layers == 2 and result.record()["f1"] == pytest.approx(sum(result.f1) / 3, abs=1e-3)
    rescaled = M.bertscore(["the cat sat on the mat", "hello there"], ["the cat sat on the mat", "general remarks"],
                           str(tiny_roberta["roberta-large"]))
    assert rescaled.computed and rescaled.rescaled and "rescaled with bert-score's en baseline" in rescaled.note
    assert rescaled.num_layers == 17   # bert-score's tuned layer for roberta-large
    assert rescaled.f1[0] == pytest.approx(100, abs=1e-3)   # (1 - b) / (1 - b): a perfect match stays 100


# --- failure buckets ------------------------------------------------------------------------------
DIALOGUE = ("Amanda: I baked cookies for the party tomorrow afternoon at the office.\n"
            "Tom: Great, I will bring the drinks and some plates.\nAmanda: See you at noon then.")
REFERENCE = "Amanda baked cookies for the office party and Tom will bring drinks and plates."


def flags(prediction, reference=REFERENCE, dialogue=DIALOGUE, truncated=False):
    return M.failure_flags(prediction, reference, dialogue, truncated)


def test_bucket_empty():
    assert flags("")["empty"] and flags(" ... ")["empty"] and not flags("Tom brings drinks.")["empty"]
    assert M.primary_bucket(flags("")) == "empty"


def test_bucket_speaker_tags():
    assert flags("Amanda: I baked cookies.")["speaker_tags"]
    assert flags("#Person1#: hello there, how are you")["speaker_tags"]
    assert flags("Speaker A: we should agree on the remote")["speaker_tags"]
    assert not flags("Amanda baked cookies and Tom brings drinks.")["speaker_tags"]
    # DialogSum references name speakers as #Person1#: the same style in a prediction is fine
    same_style = flags("#Person1# asks #Person2# for help.", reference="#Person1# needs #Person2#'s help.")
    assert not same_style["speaker_tags"]
    assert flags("#Person1# asks #Person2# for help.", reference="A man asks for help.")["speaker_tags"]


def test_bucket_copied_dialogue():
    copied = "I baked cookies for the party tomorrow afternoon at the office."
    assert flags(copied)["copied_dialogue"] and flags(copied)["copy_share"] == 1.0
    assert not flags("Amanda made sweets and Tom is in charge of beverages for everyone.")["copied_dialogue"]
    assert not flags("I baked cookies for the party")["copied_dialogue"]   # under 8 words: never a copy
    assert not M.failure_flags(copied, REFERENCE, None)["copied_dialogue"]   # no dialogue: rule skipped


def test_bucket_repetition():
    assert flags("Tom will bring drinks. Tom will bring drinks. Tom will bring drinks.")["repetition"]
    assert M.repetition("a b c a b c a b c") == (3, pytest.approx(1 - 3 / 7))
    assert flags("they plan the party then they plan the party")["repetition"]   # 2 of 7 trigrams repeat
    assert not flags("they plan the party and then they plan the party again")["repetition"]   # 2 of 9
    assert not flags("Amanda baked cookies for the office party; Tom brings drinks.")["repetition"]


def test_bucket_unsupported_names():
    result = flags("Amanda baked cookies and Tom and Bob bring drinks to Paris.")
    assert result["unsupported_names"] and result["names"] == ["Bob", "Paris"]
    assert not flags("Amanda baked cookies. Tomorrow Tom brings drinks.")["unsupported_names"]
    assert not flags("Yesterday Amanda baked cookies; TV and OK are not names.")["unsupported_names"]
    assert M.unsupported_names("Anna's cake", "anna: hi") == []


def test_bucket_lengths_and_truncation():
    assert flags("Tom brings drinks.")["too_short"]          # 3 words < 0.5 x 14
    long = " ".join(["Amanda baked cookies and Tom brought drinks"] * 5)
    assert flags(long)["too_long"] and not flags(long)["too_short"]
    assert not flags("Amanda baked cookies and Tom will bring the drinks and the plates.")["too_long"]
    assert flags("Amanda bakes.", truncated=True)["truncated_input"]
    assert not flags("Amanda bakes.", truncated=None)["truncated_input"]


def test_primary_bucket_order_and_ok():
    assert list(M.BUCKETS) == list(M.BUCKET_RULES)
    both = flags("Amanda: Amanda: Amanda: Amanda: Amanda:")
    assert both["speaker_tags"] and both["repetition"] and M.primary_bucket(both) == "speaker_tags"
    assert M.primary_bucket(flags("Amanda baked cookies for the office party; Tom will bring drinks.")) == "ok"


# --- paired bootstrap -----------------------------------------------------------------------------
def test_paired_bootstrap_identical_is_exactly_zero_and_not_significant():
    scores = [12.5, 40.0, 33.3, 0.0, 71.0]
    result = M.paired_bootstrap(scores, list(scores), 500)
    assert result.difference == 0.0 and result.low == 0.0 and result.high == 0.0
    assert not result.significant and result.p_value == 1.0
    assert result.statement("ROUGE-L", "lora", "merged").endswith("not significant")


def test_paired_bootstrap_detects_a_real_difference():
    rng = np.random.default_rng(0)
    a = rng.uniform(10, 40, 100)
    b = a + 3 + rng.normal(0, 1, 100)
    result = M.paired_bootstrap(a, b, 1000, seed=3)
    assert result.significant and result.low < result.difference < result.high and result.low > 0
    assert result.difference == pytest.approx(float(np.mean(b - a)))
    assert "significant, new is better" in result.statement("ROUGE-1", "old", "new")
    assert M.paired_bootstrap(a, b, 1000, seed=3).record() == result.record()   # seeded
    noise = M.paired_bootstrap(a, a + rng.normal(0, 5, 100), 1000)
    assert noise.low < 0 < noise.high or noise.significant   # an interval either way
    with pytest.raises(ValueError):
        M.paired_bootstrap([1, 2], [1, 2, 3])


# --- prediction CSVs ------------------------------------------------------------------------------
def _rows(ids, prediction="a summary"):
    return [{"id": i, "dialogue": f"A: line {i}", "reference": f"reference {i}", "prediction": prediction,
             "rouge1": 1.0, "rouge2": 0.0, "rougeL": 1.0, "rougeLsum": 1.0, "pred_words": 2, "ref_words": 2}
            for i in ids]


def test_read_both_formats(tmp_path):
    rows = _rows(["7", "8"])
    rows[1]["prediction"] = "one line\rand a bare carriage return,\r\nthen \"quotes\"\n"   # kept exactly
    ours = write_predictions(tmp_path / "lora_predictions.csv", rows)
    assert ours.read_text().splitlines()[0] == ",".join(f'"{c}"' for c in COLUMNS)   # every field quoted
    read = read_predictions(ours)
    assert read.name == "lora" and read.format == "finetuneflow" and read.ids == ["7", "8"]
    assert read.frame["prediction"].tolist() == ["a summary", rows[1]["prediction"]]
    assert list(read.frame.columns) == ["id", "dialogue", "reference", "prediction"]
    seed = tmp_path / "validation_predictions.csv"
    seed.write_text('sample_id,dialogue,human_summary,model_summary,rouge1\n0,"A: hi\nB: yo",greeting,,0.1\n'
                    '1,A: bye,farewell,they part,0.2\n')
    read = read_predictions(seed, name="seed-lora")
    assert read.name == "seed-lora" and read.format == "seed" and read.columns["id"] == "sample_id"
    assert read.frame["prediction"].tolist() == ["", "they part"] and read.frame["dialogue"][0] == "A: hi\nB: yo"
    assert any("1 empty predictions" in note for note in read.notes)
    bare = tmp_path / "bare.csv"
    bare.write_text("human_summary,model_summary\nx,y\n")
    read = read_predictions(bare)
    assert read.ids == ["0"] and not read.has_dialogue and any("no id column" in n for n in read.notes)


@pytest.mark.parametrize("content, message", [
    ("id,dialogue,prediction\n1,d,p\n", "has no reference column"),
    ("id,reference\n1,r\n", "has no prediction column"),
    ("", "is empty (no header, no rows)"),
    ("id,reference,prediction\n", "is empty (a header but no rows)"),
    ("id,reference,prediction\n1,r,p\n1,s,q\n", "duplicate ids"),
    ("id,reference,prediction\n1,,p\n", "empty reference"),
])
def test_read_errors(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(UserError, match=re.escape(message)):
        read_predictions(path)
    with pytest.raises(UserError, match="not found"):
        read_predictions(tmp_path / "missing.csv")


def test_versions_must_share_rows(tmp_path):
    a = read_predictions(write_predictions(tmp_path / "a_predictions.csv", _rows(["1", "2", "3"])))
    b = read_predictions(write_predictions(tmp_path / "b_predictions.csv", _rows(["3", "1", "2"], "other")))
    assert check_same_samples([a, b]) == ["1", "2", "3"]          # order may differ
    c = read_predictions(write_predictions(tmp_path / "c_predictions.csv", _rows(["1", "2", "9"])))
    with pytest.raises(UserError, match="row ids differ between a .* 1 ids only in a, 1 only in c"):
        check_same_samples([a, c])
    assert check_same_samples([a, c], allow_different=True) == ["1", "2"]
    rows = _rows(["1", "2", "3"])
    rows[0]["reference"] = "something else"
    d = read_predictions(write_predictions(tmp_path / "d_predictions.csv", rows))
    with pytest.raises(UserError, match="same id but a different reference"):
        check_same_samples([a, d])


# --- several references ---------------------------------------------------------------------------
MULTI = [("r1", "Tom and Anna meet for lunch at noon.", ["Anna and Tom will have lunch at noon.",
                                                        "Tom asks Anna to lunch.", "They meet at noon for lunch."]),
         ("r2", "Ben sells his old bike to Carl.", ["Carl buys Ben's bike.", "Ben sells the old bike to Carl.",
                                                   "Ben and Carl agree on a price for a bike."])]


def test_several_references_max_and_mean_as_computed_by_hand(project):
    """eval_metrics_bart_lora.py --reference_columns=summary1,summary2,summary3 on a small CSV: ROUGE
    is the maximum over the references with the mean beside it (rouge-score by hand), BLEU and chrF
    sacreBLEU's multi-reference scores; the rule is named in every output."""
    import csv
    import json

    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    from conftest import run_stage
    path = project / "multi.csv"
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "prediction", "summary1", "summary2", "summary3"])
        writer.writerows([[i, p, *refs] for i, p, refs in MULTI])
    result = run_stage("eval_metrics_bart_lora.py", f"--predictions={path}", "--names=multi", "--bertscore_model=",
                       "--faithfulness=false", "--reference_columns=summary1,summary2,summary3", "--output_dir=out",
                       root=project)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    with open(project / "out" / "multi_metrics.csv", encoding="utf-8", newline="") as handle:
        rows = {r["id"]: r for r in csv.DictReader(handle)}
    for row_id, prediction, refs in MULTI:
        for key in ("rouge1", "rouge2", "rougeL"):
            by_hand = [scorer.score(ref, prediction)[key].fmeasure * 100 for ref in refs]
            assert float(rows[row_id][key]) == pytest.approx(max(by_hand), abs=1e-3)
            assert float(rows[row_id][f"{key}_mean"]) == pytest.approx(sum(by_hand) / 3, abs=1e-3)
        assert float(rows[row_id]["chrf"]) == pytest.approx(CHRF().sentence_score(prediction, refs).score, abs=1e-3)
    summary = json.loads((project / "out" / "summary_metrics.json").read_text())["versions"][0]
    streams = [[refs[k] for _, _, refs in MULTI] for k in range(3)]
    assert summary["bleu"] == pytest.approx(BLEU().corpus_score([p for _, p, _ in MULTI], streams).score)
    assert summary["references"] == 3 and "maximum F1 over the references" in summary["reference_rule"]
    assert "max over 3 references" in result.stdout
    assert "maximum F1 over the references" in (project / "out" / "report.html").read_text()
    one = run_stage("eval_metrics_bart_lora.py", f"--predictions={path}", "--names=single", "--bertscore_model=",
                    "--faithfulness=false", "--output_dir=single", root=project, check=False)
    assert one.returncode == 2 and "no reference column" in one.stderr   # single reference: its own column only


@pytest.mark.e2e
def test_eval_scores_several_references_and_eval_metrics_reads_them(tiny_models, project):
    import csv
    import json

    from conftest import SAMPLES, run_stage
    rows = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines()[:3]]
    data = project / "multi.jsonl"
    data.write_text("".join(json.dumps({"id": r["id"], "dialogue": r["dialogue"], "summary1": r["summary"],
                                        "summary2": r["summary"].split(".")[0] + ".", "summary3": "They talk."})
                            + "\n" for r in rows))
    run_stage("eval_bart_lora.py", f"--model={tiny_models['llama']}", f"--dataset={data}", "--split=all",
              "--n_samples=0", "--max_new_tokens=8", "--reference_columns=summary1,summary2,summary3", "--tag=multi",
              root=project)
    record = json.loads((project / "metrics" / "multi_eval.json").read_text())
    assert record["references"]["count"] == 3 and record["references"]["csv_columns"][1] == "reference2"
    with open(project / "metrics" / "multi_predictions.csv", encoding="utf-8", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [r["reference3"] for r in written] == ["They talk."] * 3
    assert all(float(r["rougeL"]) >= float(r["rougeL_mean"]) for r in written)
    run_stage("eval_metrics_bart_lora.py", "--predictions=metrics/multi_predictions.csv", "--bertscore_model=",
              "--faithfulness=false", "--output_dir=scored", root=project)      # the record names the columns
    summary = json.loads((project / "scored" / "summary_metrics.json").read_text())["versions"][0]
    assert summary["references"] == 3 and summary["rougeL"] == pytest.approx(record["averages"]["rougeL"], abs=1e-3)
