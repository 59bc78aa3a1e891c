"""Consensus (MBR) decoding: the choice (quality/mbr.py, with the real faithfulness check), the
settings contract (DECODING and NUM_BEAMS as one choice, inherited as one), the engine's
candidates mode on the transformers backend (MBR_SAMPLES=1 equals greedy, seeds repeat, a row's
samples do not depend on its batch, the prompt is encoded once per batch), and the evaluation
stage as a user runs it (its record, its CSV, the same command giving the same text).

The rule tested as "MBR with one sample equals greedy": with MBR_SAMPLES=1 there are two
candidates; under a symmetric utility (rougeL, minilm) each one's agreement is the same F1, and a
tie goes to the greedy summary. So MBR_SAMPLES=1 with MBR_FAITHFUL=False returns exactly the
greedy summaries (with the faithful filter on, a flagged greedy summary may lose to a clean sample).
"""
from __future__ import annotations

import csv
import json

import pytest

from conftest import SAMPLES, files_under, run_stage
from finetuneflow.contract.decoding import GenerationSettings, Mbr, coupled_skips, override
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.record import RunRecord
from finetuneflow.quality.mbr import agreement, choose, choose_rows

DIALOGUE = "#Person1#: Shall we meet Anna at the cafe at 3 pm?\n#Person2#: Yes, at the cafe on Main Street at 3."
GOOD = "#Person1# and #Person2# will meet Anna at the cafe at 3 pm."


def dialogues(n: int) -> list[str]:
    rows = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["dialogue"] for r in rows[:n]]


# ----------------------------------------------------------------------------- the choice

def test_an_unfaithful_candidate_is_never_chosen_even_when_it_agrees_most():
    # the unfaithful one (Paris, 5 pm: not in the dialogue) is the consensus of the set...
    unfaithful = "#Person1# and #Person2# will meet Anna in Paris at 5 pm."
    candidates = [GOOD, unfaithful, unfaithful + " ", "#Person1# and #Person2# will meet Anna in Paris at 5 pm today."]
    assert choose(candidates, DIALOGUE, "rougeL", faithful=False).index != 0     # ... so without the filter it wins
    choice = choose(candidates, DIALOGUE, "rougeL", faithful=True)
    assert choice.index == 0 and choice.dropped == 3 and not choice.all_flagged and choice.checked


def test_when_every_candidate_is_flagged_all_are_kept_and_counted():
    candidates = ["They meet in Paris.", "They meet in Paris at 5 pm.", "They meet in Rome."]
    choice = choose(candidates, DIALOGUE, "rougeL", faithful=True)
    assert choice.all_flagged and choice.dropped == 0 and choice.index == 0   # the first two tie: the greedy one


def test_ties_go_to_the_greedy_summary_then_the_lowest_index():
    assert choose([GOOD, "They meet at 3 pm."], DIALOGUE, "rougeL", faithful=False).index == 0   # two: always a tie
    assert choose(["a b c", "x y z", "x y z"], "", "rougeL", faithful=False).index == 1
    matrix = agreement(["a b c", "a b d", "q r s"], "rougeL")
    assert (matrix == matrix.T).all() and matrix[0, 1] == pytest.approx(2 / 3)


def test_chrf_utility_and_the_rows_chooser():
    choices = choose_rows(Mbr(samples=2, utility="chrf", faithful=False), [DIALOGUE],
                          [["the cat sat", "the cat sat down", "a dog ran off"]])
    assert [c.index for c in choices] == [1]     # chrF weighs recall twice: the longer of the two agreeing wins
    matrix = agreement(["the cat sat", "the cat sat down"], "chrf")
    assert matrix[1, 0] > matrix[0, 1]           # not symmetric (so MBR_SAMPLES=1 need not keep the greedy one)


# ----------------------------------------------------------------------------- the settings contract

@pytest.mark.parametrize("settings,message", [
    ({"decoding": "mbr", "num_beams": 4}, "DECODING=mbr decodes with one beam, but NUM_BEAMS=4"),
    ({"decoding": "greedy", "num_beams": 2}, "DECODING=greedy decodes with one beam"),
    ({"decoding": "beam", "num_beams": 1}, "DECODING=beam needs NUM_BEAMS >= 2"),
    ({"mbr_samples": 3}, "MBR_SAMPLES=3 only applies to DECODING=mbr"),
    ({"decoding": "greedy", "mbr_utility": "chrf"}, "MBR_UTILITY=chrf only applies to DECODING=mbr"),
])
def test_contradictions_are_one_line(settings, message):
    with pytest.raises(UserError, match=message):
        GenerationSettings(**settings)


def test_decoding_and_beams_are_inherited_as_one_choice():
    record = RunRecord("eval", generation=GenerationSettings(num_beams=4, decoding="beam"))
    mbr = RunRecord("eval", generation=GenerationSettings(num_beams=1, decoding="mbr", mbr_samples=4, mbr_seed=7))
    cfg = {"DECODING": "mbr", "NUM_BEAMS": None, "MBR_SAMPLES": None}
    assert record.inherit_into(cfg, ["DECODING", "NUM_BEAMS", "MBR_SAMPLES"]) == [] and cfg["NUM_BEAMS"] is None
    cfg = {"DECODING": None, "NUM_BEAMS": 4, "MBR_SAMPLES": None}
    assert mbr.inherit_into(cfg, ["DECODING", "NUM_BEAMS", "MBR_SAMPLES"]) == []      # explicit beams: no MBR
    cfg = {"DECODING": None, "NUM_BEAMS": None, "MBR_SAMPLES": None, "MBR_SEED": None}
    assert mbr.inherit_into(cfg, list(cfg)) == ["DECODING", "NUM_BEAMS", "MBR_SAMPLES", "MBR_SEED"]
    assert coupled_skips({"DECODING": "greedy"}) >= {"NUM_BEAMS", "MBR_SAMPLES"}
    server = GenerationSettings(num_beams=4)
    assert override(server, {"decoding": "mbr"}, {"mbr_samples": 2}) == GenerationSettings(decoding="mbr",
                                                                                          mbr_samples=2)
    assert override(GenerationSettings(decoding="mbr", mbr_samples=2), {"num_beams": 3}).decoding is None


def test_a_rows_seed_depends_on_its_prompt_and_the_seed_only():
    mbr = Mbr(seed=5)
    assert mbr.row_seed([1, 2, 3]) == Mbr(seed=5, samples=3).row_seed([1, 2, 3]) != mbr.row_seed([1, 2, 4])
    assert Mbr(seed=6).row_seed([1, 2, 3]) != mbr.row_seed([1, 2, 3])
    assert GenerationSettings(decoding="mbr", mbr_samples=3).without_mbr() == GenerationSettings(decoding="greedy")


# ----------------------------------------------------------------------------- the engine (transformers)

@pytest.fixture(scope="module")
def loaded_models(tiny_models):
    import torch
    from finetuneflow.model.loading import load_model
    return {name: load_model(str(tiny_models[name]), device="cpu", dtype=torch.float32) for name in ("llama", "bart")}


def mbr(**knobs) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=10, decoding="mbr", **knobs)


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_one_sample_without_the_filter_equals_greedy_and_seeds_repeat(loaded_models, family):
    from finetuneflow.engine.generation import summarize
    loaded, texts = loaded_models[family], dialogues(6)
    # DECODING=greedy: the tiny BART's own config asks for beams (MBR's first candidate is greedy)
    greedy = summarize(loaded, texts, GenerationSettings(max_new_tokens=10, decoding="greedy"), batch_size=4,
                       progress=False)
    one = summarize(loaded, texts, mbr(mbr_samples=1, mbr_faithful=False), batch_size=4, progress=False,
                    chooser=choose_rows)
    assert one.summaries == greedy.summaries and one.settings["decoding"] == "mbr"
    three = summarize(loaded, texts, mbr(mbr_samples=3), batch_size=4, progress=False, chooser=choose_rows)
    again = summarize(loaded, texts, mbr(mbr_samples=3), batch_size=2, progress=False, chooser=choose_rows)
    assert three.summaries == again.summaries            # same seed, other batches: the same text
    assert [r["choice"] for r in three.mbr_rows] == [r["choice"] for r in again.mbr_rows]
    assert three.mbr_totals["rows"] == 6 and three.mbr_totals["candidates"] == 24
    other = summarize(loaded, texts, mbr(mbr_samples=3, mbr_seed=1, mbr_faithful=False), batch_size=4,
                      progress=False, chooser=choose_rows)
    assert other.mbr_totals["candidate_tokens"] > 0


def test_the_prompt_is_encoded_once_per_batch(loaded_models):
    """Count the model's forward calls over more than one token (a prompt's prefill): MBR with 3
    samples runs exactly as many as greedy decoding, one per batch (the samples reuse the cache)."""
    from finetuneflow.engine.generation import summarize
    from finetuneflow.model.backends.hf import unwrap
    counts = {}
    for family in ("llama", "bart"):
        loaded = loaded_models[family]
        inner = unwrap(loaded.model)
        module = inner.get_encoder() if family == "bart" else inner.model
        calls = []
        hook = module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
            (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[1]),
            with_kwargs=True)
        try:
            summarize(loaded, dialogues(8), GenerationSettings(max_new_tokens=6), batch_size=4, progress=False)
            greedy = sum(n > 1 for n in calls)
            calls.clear()
            summarize(loaded, dialogues(8), mbr(mbr_samples=3), batch_size=4, progress=False, chooser=choose_rows)
            counts[family] = (greedy, sum(n > 1 for n in calls), len(calls))
        finally:
            hook.remove()
    assert counts["bart"][:2] == (2, 2)          # the encoder: once per batch of 4, not 4 times
    assert counts["llama"][1] == 2 and counts["llama"][0] <= 3   # (greedy may also compute the shared prefix once)


def test_mbr_without_a_chooser_is_a_programming_error(loaded_models):
    from finetuneflow.engine.generation import summarize
    with pytest.raises(ValueError, match="needs a chooser"):
        summarize(loaded_models["llama"], dialogues(1), mbr(), progress=False)


# ----------------------------------------------------------------------------- the stage

@pytest.mark.slow
@pytest.mark.e2e
def test_eval_with_mbr_records_its_decoding_cost_and_choice(tiny_models, project):
    common = [f"--model={tiny_models['llama']}", f"--dataset={SAMPLES}", "--split=all", "--n_samples=5",
              "--max_new_tokens=8", "--batch_size=4", "--decoding=mbr", "--mbr_samples=3"]
    result = run_stage("eval_bart_lora.py", *common, "--tag=mbr", root=project)
    run_stage("eval_bart_lora.py", *common, "--batch_size=2", "--tag=again", root=project)
    metrics = project / "metrics"
    assert files_under(metrics) == {f"{t}_{k}" for t in ("mbr", "again")
                                    for k in ("predictions.csv", "eval.json", "run_config.json")}

    def read(tag):
        with open(metrics / f"{tag}_predictions.csv", encoding="utf-8", newline="") as handle:
            return list(csv.DictReader(handle))
    # the same command (even with another batch size) gives the same text
    assert [(r["prediction"], r["mbr_choice"]) for r in read("mbr")] == \
        [(r["prediction"], r["mbr_choice"]) for r in read("again")]
    assert {r["mbr_choice"] for r in read("mbr")} <= {"0", "1", "2", "3"}
    record = json.loads((metrics / "mbr_eval.json").read_text())
    generation, cost = record["generation"], record["mbr"]["cost"]
    assert (generation["decoding"], generation["mbr_samples"], generation["mbr_utility"]) == ("mbr", 3, "rougeL")
    assert generation["mbr_faithful"] is True and generation["mbr_seed"] == 42 and generation["mbr_top_p"] == 0.95
    assert record["mbr"]["candidates_per_row"] == 4 and cost["greedy_tokens_per_row"] <= cost["tokens_per_row"]
    assert cost["seconds_per_row"] >= cost["greedy_seconds_per_row"] > 0
    assert record["mbr"]["dropped_unfaithful"] >= 0 and "rows_all_flagged" in record["mbr"]
    assert "MBR cost per row" in result.stdout
    finished = json.loads((metrics / "mbr_run_config.json").read_text())
    assert finished["generation"]["decoding"] == "mbr" and finished["generation"]["mbr_samples"] == 3
