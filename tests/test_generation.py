"""The generation engine on the tiny models: original order after length sorting, identical
outputs at any batch size, recorded settings, truncation flags, token counts and the
out-of-memory retry."""
from __future__ import annotations

import json

import pytest
import torch

from finetuneflow.engine import generation as G
from finetuneflow.engine.generation import GenerationSettings, summarize
from finetuneflow.model.backends import finish
from finetuneflow.model.family import CAUSAL_DEFAULTS
from finetuneflow.model.loading import load_model

from conftest import SAMPLES

ROWS = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
# different lengths, in an order that length sorting changes
DIALOGUES = [ROWS[i]["dialogue"] for i in (3, 0, 7, 12, 5)]
DIALOGUES[2] = DIALOGUES[2][:120]


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_model(str(tiny_models["llama"]), device="cpu")


@pytest.fixture(scope="module")
def bart(tiny_models):
    return load_model(str(tiny_models["bart"]), device="cpu")


GREEDY = GenerationSettings(max_new_tokens=8)


def test_order_is_restored_after_length_sorting(llama):
    batched = summarize(llama, DIALOGUES, GREEDY, batch_size=2, max_input_length=256, progress=False)
    one_by_one = [summarize(llama, [d], GREEDY, batch_size=1, max_input_length=256, progress=False).summaries[0]
                  for d in DIALOGUES]
    assert batched.summaries == one_by_one
    assert len(set(batched.summaries)) > 1          # the tiny model does answer differently per input
    reversed_run = summarize(llama, DIALOGUES[::-1], GREEDY, batch_size=2, max_input_length=256, progress=False)
    assert reversed_run.summaries == batched.summaries[::-1]


@pytest.mark.parametrize("family", ["bart", "llama"])
def test_batch_size_does_not_change_outputs(family, request):
    loaded = request.getfixturevalue(family)
    settings = GenerationSettings(max_new_tokens=10) if family == "llama" else GenerationSettings()
    one = summarize(loaded, DIALOGUES, settings, batch_size=1, max_input_length=256, progress=False)
    four = summarize(loaded, DIALOGUES, settings, batch_size=4, max_input_length=256, progress=False)
    assert one.summaries == four.summaries and one.generated_tokens == four.generated_tokens
    assert one.batch_size == 1 and four.batch_size == 4


def test_effective_settings_are_recorded(bart, llama):
    config = bart.model.generation_config
    result = summarize(bart, DIALOGUES[:2], GenerationSettings(num_beams=1, max_new_tokens=6), progress=False)
    # seq2seq: the model's generation config, except what the caller overrides
    assert result.settings["num_beams"] == 1 and result.settings["max_new_tokens"] == 6
    assert result.settings["no_repeat_ngram_size"] == 3 and result.settings["length_penalty"] == 2.0
    assert "max_length" not in result.settings and result.settings["do_sample"] is False
    assert bart.model.generation_config is config and config.num_beams == 2   # restored after the call
    default = summarize(bart, DIALOGUES[:1], None, progress=False)
    assert default.settings["num_beams"] == 2 and default.settings["max_length"] == 40
    causal = summarize(llama, DIALOGUES[:1], GenerationSettings(), progress=False)
    assert causal.settings["num_beams"] == 1 and causal.settings["max_new_tokens"] == CAUSAL_DEFAULTS["max_new_tokens"]
    # a causal prompt shares the 512-token context with the new tokens
    assert causal.max_input_length == 512 - CAUSAL_DEFAULTS["max_new_tokens"]
    assert G.GenerationSettings.from_config({"NUM_BEAMS": 3, "MAX_NEW_TOKENS": None}).overrides() == {"num_beams": 3}


def test_truncation_flags_and_timing(llama):
    long = ROWS[0]["dialogue"] * 6
    result = summarize(llama, [long, "A: hi\nB: hello"], GREEDY, max_input_length=96, progress=False)
    assert result.truncated == [True, False] and result.max_input_length == 96
    timing = result.timing()
    assert timing["generated_tokens"] == result.generated_tokens and 0 < result.generated_tokens <= 16
    assert timing["samples_per_s"] > 0 and timing["tokens_per_s"] > 0
    empty = summarize(llama, [], GREEDY, progress=False)
    assert empty.summaries == [] and empty.generated_tokens == 0


def test_generated_token_count_stops_at_the_first_stop_token():
    rows = finish([[5, 6, 2, 2], [5, 6, 7, 8], [2, 9, 9, 9]], {2}, max_new_tokens=4)
    assert [r.counted for r in rows] == [3, 4, 1] and [r.ids for r in rows] == [[5, 6], [5, 6, 7, 8], []]
    assert [r.finish_reason for r in rows] == ["stop", "length", "stop"]


def test_out_of_memory_halves_the_batch_and_retries(llama, monkeypatch):
    backend = type(llama.backend)
    real = backend.generate_batch
    sizes = []

    def flaky(self, loaded, batch, effective):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, loaded, batch, effective)

    monkeypatch.setattr(backend, "generate_batch", flaky)
    result = summarize(llama, DIALOGUES, GREEDY, batch_size=8, max_input_length=256, progress=False)
    monkeypatch.undo()
    expected = summarize(llama, DIALOGUES, GREEDY, batch_size=2, max_input_length=256, progress=False)
    assert sizes[:2] == [5, 4] and result.batch_size == 2
    assert result.summaries == expected.summaries

    def broken(self, loaded, batch, effective):
        raise RuntimeError("shape mismatch")   # not a memory error: raised as is

    monkeypatch.setattr(backend, "generate_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        summarize(llama, DIALOGUES, GREEDY, batch_size=8, progress=False)


def test_no_repeat_ngram_ignores_the_prompt_of_a_causal_model():
    """A fine-tuned causal model must be free to copy names and speaker tags from the dialogue."""
    import torch
    from transformers import NoRepeatNGramLogitsProcessor

    from finetuneflow.model.backends.hf import GeneratedNoRepeatNGram
    ids = torch.tensor([[5, 6, 7, 9, 5, 6]])          # prompt 5 6 7 9, generated so far 5 6
    scores = torch.zeros(1, 10)
    assert NoRepeatNGramLogitsProcessor(3)(ids, scores.clone())[0, 7] == float("-inf")
    assert torch.isfinite(GeneratedNoRepeatNGram(3, prompt_length=4)(ids, scores.clone())).all()
    ids = torch.tensor([[5, 6, 7, 9, 1, 2, 1]])       # generated 1 2 1: "1 2" may not repeat
    assert GeneratedNoRepeatNGram(2, prompt_length=4)(ids, scores.clone())[0, 2] == float("-inf")


# --- exact speed-ups (model/backends/hf.py): identical token ids, used only where the rule says ---------
from finetuneflow.engine.generation import effective_settings  # noqa: E402
from finetuneflow.model.backends import hf  # noqa: E402


def token_ids(loaded, dialogues, settings, batch_size, speedups: bool, sampling=None):
    """The new token ids of every row, batch by batch as the engine forms them."""
    effective = effective_settings(loaded, settings, sampling)
    encoded = [G.encode(loaded, d, "Summarize the following dialogue in one to three sentences.", 256)[0]
               for d in dialogues]
    with hf.exact_speedups(speedups):
        return [[o.ids for o in loaded.backend.generate_batch(loaded, encoded[i:i + batch_size], effective)]
                for i in range(0, len(encoded), batch_size)]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
@pytest.mark.parametrize("no_repeat", [None, 3])
def test_exact_speedups_leave_greedy_token_ids_unchanged(llama, batch_size, no_repeat, lookup_on_cpu):
    settings = GenerationSettings(max_new_tokens=24, no_repeat_ngram_size=no_repeat)
    plain = token_ids(llama, DIALOGUES, settings, batch_size, speedups=False)
    fast = token_ids(llama, DIALOGUES, settings, batch_size, speedups=True)
    assert fast == plain and sum(len(ids) for batch in plain for ids in batch) > 5 * 10


def test_prefix_cache_leaves_seeded_sampling_unchanged(llama):
    sampling = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    plain = token_ids(llama, DIALOGUES, GREEDY, 3, speedups=False, sampling=sampling)
    fast = token_ids(llama, DIALOGUES, GREEDY, 3, speedups=True, sampling=sampling)
    assert fast == plain


@pytest.fixture
def lookup_on_cpu(monkeypatch):
    """Prompt lookup is for GPUs (measured slower on this CPU); its exactness is tested here on the CPU."""
    monkeypatch.setattr(hf, "PROMPT_LOOKUP_DEVICES", frozenset({"cpu", "cuda"}))


def test_prompt_lookup_is_off_on_a_cpu_by_default(llama):
    encoded = [G.encode(llama, d, "Summarize.", 256)[0] for d in DIALOGUES]
    assert "cpu" not in hf.PROMPT_LOOKUP_DEVICES
    assert "prompt_lookup" not in hf.speedups_for(llama, encoded[:1], effective_settings(llama, GREEDY))


def test_speedup_rule_per_batch(llama, bart, lookup_on_cpu):
    encoded = [G.encode(llama, d, "Summarize.", 256)[0] for d in DIALOGUES]
    greedy = effective_settings(llama, GREEDY)
    assert hf.speedups_for(llama, encoded[:1], greedy) == ("prompt_lookup",)       # one greedy causal row
    assert hf.speedups_for(llama, encoded[:3], greedy) == ("prefix_cache",)        # rows sharing the prompt
    beams = effective_settings(llama, GenerationSettings(num_beams=2, max_new_tokens=8))
    assert hf.speedups_for(llama, encoded[:3], beams) == ()
    sampled = effective_settings(llama, GREEDY, {"temperature": 0.8, "seed": 1})
    assert "prompt_lookup" not in hf.speedups_for(llama, encoded[:1], sampled)    # drafts are for greedy only
    seq2seq = [G.encode(bart, d, "", 256)[0] for d in DIALOGUES]
    assert hf.speedups_for(bart, seq2seq[:1], effective_settings(bart, GREEDY)) == ()
    assert hf.speedups_for(bart, seq2seq[:3], effective_settings(bart, GREEDY)) == ()
    with hf.exact_speedups(False):
        assert hf.speedups_for(llama, encoded[:3], greedy) == ()
    unrelated = [list(range(100, 140)), list(range(200, 240))]                      # nothing shared
    assert hf.speedups_for(llama, unrelated, greedy) == ()


def test_the_shared_prefix_is_computed_once_and_kept_per_model(llama, lookup_on_cpu):
    store = hf._store(llama)
    store.caches.clear()
    result = summarize(llama, DIALOGUES, GREEDY, batch_size=2, max_input_length=256, progress=False)
    # 5 rows at batch 2: two shared-prefix batches, then one row alone (prompt lookup)
    assert result.speedups == {"prefix_cache": 2, "prompt_lookup": 1}
    kept = dict(store.caches)
    encoded = [G.encode(llama, d, "Summarize the following dialogue in one to three sentences.", 256)[0]
               for d in DIALOGUES]
    # the template, system prompt and instruction (a dialogue's first characters may merge into the
    # template's last token, so a batch's shared prefix can end a few tokens earlier)
    assert 1 <= len(kept) <= 2
    assert all(hf.MIN_SHARED_PREFIX <= len(prefix) <= hf._common_prefix(encoded) + 8 for prefix in kept)
    again = summarize(llama, DIALOGUES[::-1], GREEDY, batch_size=2, max_input_length=256, progress=False)
    assert again.summaries == result.summaries[::-1]
    assert set(store.caches) == set(kept) and all(store.caches[k] is kept[k] for k in kept)   # reused, not redone
    for _ in range(hf.PREFIX_SLOTS + 2):   # rows sharing other prefixes: the store keeps the latest few
        other = [list(range(300 + _, 340 + _)) + [5, 6], list(range(300 + _, 340 + _)) + [7, 8, 9]]
        llama.backend.generate_batch(llama, other, effective_settings(llama, GenerationSettings(max_new_tokens=1)))
    assert len(store.caches) == hf.PREFIX_SLOTS
