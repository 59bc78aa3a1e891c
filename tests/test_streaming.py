"""Token streaming below the server (engine/streaming.py and each backend's per-step callback):
the pieces a sink hears add up to exactly the engine's summaries, inside a micro-batch, on the
tiny BART and Llama (and the tiny GGUF through llama.cpp); no piece ends in a broken UTF-8
character; a row whose consumer left stops while the rest of its batch goes on unchanged."""
from __future__ import annotations

import json

import pytest

from conftest import SAMPLES
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.engine.generation import summarize
from finetuneflow.engine.streaming import REPLACEMENT, TextStream, TokenSink

ROWS = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
DIALOGUES = [r["dialogue"] for r in ROWS if len(r["dialogue"]) < 600][:5]
SETTINGS = GenerationSettings(max_new_tokens=16, num_beams=1)


class Collect(TokenSink):
    def __init__(self, stop_after: dict[int, int] | None = None):
        self.pieces: dict[int, list[str]] = {}
        self.steps: dict[int, int] = {}
        self.stop_after = stop_after or {}

    def wants(self, row):
        return True

    def text(self, row, piece):
        assert piece
        self.pieces.setdefault(row, []).append(piece)

    def stopped(self, row):
        self.steps[row] = self.steps.get(row, 0) + 1
        return row in self.stop_after and self.steps[row] > self.stop_after[row]

    def joined(self, row):
        return "".join(self.pieces.get(row, []))


@pytest.fixture(scope="module")
def gguf(tiny_models, tmp_path_factory):
    """The tiny Llama as an f32 GGUF through llama.cpp's converter, loaded (skips where absent)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install-llama)")
    from finetuneflow.contract.errors import UserError
    from finetuneflow.model.loading import load_model
    from finetuneflow.ship.gguf_export import ensure_converter, run_converter
    try:
        ensure_converter()
    except UserError as exc:
        pytest.skip(f"llama.cpp's converter cannot be installed here: {exc}")
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    run_converter(tiny_models["llama"], path, "f32", None)
    loaded = load_model(str(path), device="cpu")
    yield loaded
    loaded.backend.close(loaded)


@pytest.fixture(scope="module")
def models(tiny_models):
    from finetuneflow.model.loading import load_model
    return {name: load_model(str(path), device="cpu") for name, path in tiny_models.items()}


@pytest.mark.parametrize("name", ["llama", "bart"])
def test_streamed_pieces_add_up_to_the_batched_summaries(models, name):
    loaded = models[name]
    plain = summarize(loaded, DIALOGUES, SETTINGS, batch_size=8, progress=False, max_input_length=256)
    sink = Collect()
    streamed = summarize(loaded, DIALOGUES, SETTINGS, batch_size=8, progress=False, max_input_length=256, sink=sink)
    assert streamed.summaries == plain.summaries
    for i, summary in enumerate(plain.summaries):
        assert sink.joined(i) == summary
    assert max(len(sink.pieces[i]) for i in range(len(DIALOGUES))) > 3     # token by token, not one piece


def test_beam_search_sends_each_summary_whole(models):
    sink = Collect()
    result = summarize(models["bart"], DIALOGUES[:2], GenerationSettings(max_new_tokens=12, num_beams=2),
                       progress=False, max_input_length=256, sink=sink)
    for i, summary in enumerate(result.summaries):
        assert sink.pieces.get(i, []) == ([summary] if summary else [])


def test_a_row_whose_consumer_left_stops_and_the_batch_goes_on(models):
    loaded = models["llama"]
    settings = GenerationSettings(max_new_tokens=24, min_new_tokens=24, num_beams=1)
    plain = summarize(loaded, DIALOGUES[:3], settings, batch_size=8, progress=False, max_input_length=256)
    sink = Collect(stop_after={1: 3})
    cut = summarize(loaded, DIALOGUES[:3], settings, batch_size=8, progress=False, max_input_length=256, sink=sink)
    assert cut.generated[1] < plain.generated[1] == 24
    assert [cut.summaries[i] for i in (0, 2)] == [plain.summaries[i] for i in (0, 2)]


def test_a_character_split_across_tokens_never_streams_broken(models):
    tokenizer = models["llama"].tokenizer
    text = "Ünïcödé: 日本語のテキスト, emoji ☕🙂 and Ω — done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(REPLACEMENT in tokenizer.decode([t]) for t in ids)     # the tokenizer does split characters
    stream, pieces = TextStream(tokenizer), []
    for token in ids:
        piece = stream.push(token)
        assert REPLACEMENT not in piece
        pieces.append(piece)
    final = tokenizer.decode(ids, skip_special_tokens=True).strip()
    pieces.append(stream.finish(final))
    assert "".join(pieces) == final == text
    assert sum(1 for p in pieces if p) > 5


def test_whitespace_the_final_strip_removes_is_never_streamed(models):
    tokenizer = models["llama"].tokenizer
    ids = tokenizer.encode("  two words  \n", add_special_tokens=False)
    stream = TextStream(tokenizer)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == "two words" and stream.finish("two words") == ""


def test_llama_cpp_streams_each_sequence(gguf):
    plain = summarize(gguf, DIALOGUES, SETTINGS, batch_size=8, progress=False, max_input_length=256)
    sink = Collect(stop_after={2: 2})
    streamed = summarize(gguf, DIALOGUES, SETTINGS, batch_size=8, progress=False, max_input_length=256, sink=sink)
    for i in (0, 1, 3, 4):
        assert streamed.summaries[i] == plain.summaries[i] == sink.joined(i)
    assert streamed.generated[2] <= 3 < plain.generated[2] or plain.generated[2] <= 3
    assert max(len(sink.pieces.get(i, [])) for i in (0, 1, 3, 4)) > 3


@pytest.mark.parametrize("name", ["bart", "llama"])
def test_ctranslate2_streams_through_its_step_callback(tiny_models, tmp_path, name):
    pytest.importorskip("ctranslate2")
    from finetuneflow.model.loading import load_model
    from finetuneflow.ship.ct2_export import convert_to_ct2
    folder = tmp_path / f"ct2-{name}"
    convert_to_ct2(tiny_models[name], folder, "float32")
    loaded = load_model(str(folder), device="cpu")
    assert loaded.backend.capabilities.token_streaming
    plain = summarize(loaded, DIALOGUES, SETTINGS, batch_size=8, progress=False, max_input_length=256)
    sink = Collect(stop_after={1: 2})
    streamed = summarize(loaded, DIALOGUES, SETTINGS, batch_size=8, progress=False, max_input_length=256, sink=sink)
    for i in (0, 2, 3, 4):
        assert streamed.summaries[i] == plain.summaries[i] == sink.joined(i)
    assert max(len(sink.pieces.get(i, [])) for i in (0, 2, 3, 4)) > 3
    assert len(streamed.summaries[1]) <= len(plain.summaries[1])


def openai_streams(loaded, model_id: str) -> None:
    """The official openai client, stream=True, against the app serving `loaded`: several deltas per
    summary whose concatenation is the non-streamed answer."""
    openai = pytest.importorskip("openai")
    from fastapi.testclient import TestClient
    from finetuneflow.serve.http_api import create_app
    from finetuneflow.serve.options import ServerOptions
    with TestClient(create_app(loaded, ServerOptions(max_new_tokens=16, checks_encoder=""))) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
        for dialogue in DIALOGUES[:3]:
            messages = [{"role": "user", "content": dialogue}]
            answer = client.chat.completions.create(model=model_id, messages=messages, temperature=0)
            chunks = client.chat.completions.create(model=model_id, messages=messages, temperature=0, stream=True)
            deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
            assert len(deltas) > 1 and "".join(deltas) == answer.choices[0].message.content


def test_the_openai_client_streams_a_ctranslate2_export(tiny_models, tmp_path):
    pytest.importorskip("ctranslate2")
    from finetuneflow.model.loading import load_model
    from finetuneflow.ship.ct2_export import convert_to_ct2
    convert_to_ct2(tiny_models["llama"], tmp_path / "ct2-llama", "float32")
    openai_streams(load_model(str(tmp_path / "ct2-llama"), device="cpu"), "ct2-llama")


def test_the_openai_client_streams_a_gguf(gguf):
    openai_streams(gguf, "tiny-f32.gguf")


def test_a_batch_that_runs_again_streams_only_what_is_new():
    """Out-of-memory halving or a failed shared batch rerun regenerates text a client already has."""
    from types import SimpleNamespace
    from finetuneflow.serve.streams import BatchSink
    got = []
    job = SimpleNamespace(events=object(), cancelled=False, sent={}, stream=lambda d: got.append(d.text))
    first = BatchSink([(job, 0)])
    for piece in ("Tom", " and", " Ann"):
        first.text(0, piece)
    again = BatchSink([(job, 0)])
    for piece in ("Tom", " and", " Ann", " meet", "."):
        again.text(0, piece)
    assert got == ["Tom", " and", " Ann", " meet", "."] and job.sent[0] == "Tom and Ann meet."
