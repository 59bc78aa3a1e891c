"""CTranslate2 export: convert a Hugging Face model folder into a CTranslate2 folder that the CT2
backend (model/backends/ct2.py) loads like any model.

The folder holds CTranslate2's model.bin/config.json/vocabulary, the tokenizer files,
generation_config.json, the Hugging Face config as hf_config.json, and a run record whose
`backend` is "ctranslate2".

Conversion fixes what ctranslate2's converter does not handle by itself:
* `BartConfig.normalize_before` no longer exists in transformers 5: BART is post-norm, so it is
  set to False (the converter reads it);
* vocabulary vs `vocab_size`: the vocabulary is padded with unused tokens when the embedding
  matrix is larger than the tokenizer (resized embeddings), and truncated by the converter when
  it is smaller (bart-large-cnn: 50264 rows, 50265 tokens);
* transformers 5 T5 configs say `tie_word_embeddings=True` always and keep the output scaling in
  `scale_decoder_outputs`; the converter scales by the former, so it is given the latter;
* a model without a BOS token (CT2's config needs a string) gets its EOS token there.

`CT2Exporter` runs it through the export skeleton (ship/exporter.py): the folder is converted into a
temporary folder beside OUTPUT_DIR, loaded from there by the CT2 backend (the same hook inference
and the HTTP service use) and verified with the parity toolkit (ship/parity.py): teacher-forced
log-probabilities of the reference summaries (CTranslate2's Translator returns no logits; for
decoder-only models the argmax agreement of the full logits too) judged against
THRESHOLDS[("ct2", quantization)], and the summaries of both with the evaluated decoding settings
side by side. Only then does it replace OUTPUT_DIR (contract/safety.py: an earlier export there
needs OVERWRITE=True; the source model, the project root or a folder of other files never).
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.io import atomic_write_json
from finetuneflow.contract.paths import FT_OUTPUTS
from finetuneflow.contract.record import write_record
from finetuneflow.contract.safety import check_output_dir, replace_dir
from finetuneflow.model.backends.ct2 import CPU_QUANTIZATIONS, HF_CONFIG, QUANTIZATIONS
from finetuneflow.ship.exporter import STAGE, Exporter, ExportSettings, Resolved, exported_record, print_side_by_side
from finetuneflow.ship.source import ModelFolder


@contextmanager
def _vocabulary_padding(config_class_name: str):
    """Swap the converter's loader for one that pads the vocabulary up to the embedding rows."""
    from ctranslate2.converters import transformers as ct2_transformers
    loaders = ct2_transformers._MODEL_LOADERS
    original = loaders.get(config_class_name)
    if original is None:
        yield
        return

    class Padded(type(original)):
        padded = 0

        def get_vocabulary(self, model, tokenizer):
            tokens = super().get_vocabulary(model, tokenizer)
            rows = model.get_input_embeddings().weight.shape[0]
            if len(tokens) < rows:
                Padded.padded = rows - len(tokens)
                tokens = tokens + [f"<ftf_unused_{i}>" for i in range(len(tokens), rows)]
            return tokens

    loaders[config_class_name] = Padded()
    try:
        yield Padded
    finally:
        loaders[config_class_name] = original


def _converter_class():
    import ctranslate2

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            config = model.config
            if getattr(config, "model_type", "") == "bart":
                try:
                    config.normalize_before
                except AttributeError:   # removed in transformers 5; BART is post-layer-norm
                    config.normalize_before = False
            if hasattr(config, "scale_decoder_outputs"):
                # transformers 5 T5 always reports tie_word_embeddings=True and keeps the old meaning
                # (scale the decoder output by d_model**-0.5) in scale_decoder_outputs, while the
                # converter still reads tie_word_embeddings; lm_head is copied on its own either way
                config.tie_word_embeddings = bool(config.scale_decoder_outputs)
            return model

    return Converter


def convert_to_ct2(model_dir: Path, out_dir: Path, quantization: str) -> dict:
    """Convert the Hugging Face folder `model_dir` into `out_dir` (replacing what is there)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    if quantization not in QUANTIZATIONS:
        raise UserError(f"QUANTIZATION={quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    start = time.perf_counter()
    with _vocabulary_padding(type(config).__name__) as padded:
        try:
            _converter_class()(str(model_dir)).convert(str(out_dir), quantization=quantization, force=True)
        except (ValueError, NotImplementedError) as exc:   # unsupported architecture or option
            raise UserError(f"CTranslate2 cannot convert {model_dir}: {first_line(exc, 400)}") from None
    ct2_config_path = out_dir / "config.json"
    ct2_config = json.loads(ct2_config_path.read_text(encoding="utf-8"))
    if ct2_config.get("bos_token") is None:   # CT2 needs a string; a model without BOS never uses it
        ct2_config["bos_token"] = ct2_config.get("eos_token")
        atomic_write_json(ct2_config_path, ct2_config)
    tokenizer.save_pretrained(out_dir)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    generation.save_pretrained(out_dir)
    atomic_write_json(out_dir / HF_CONFIG, config.to_dict())
    rows = getattr(config, "vocab_size", None)
    return {"quantization": quantization, "seconds": round(time.perf_counter() - start, 2),
            "vocabulary": {"model_vocab_size": rows, "tokenizer_size": len(tokenizer),
                           "padded_tokens": getattr(padded, "padded", 0) if padded else 0,
                           "truncated_tokens": max(0, len(tokenizer) - rows) if rows else 0},
            "bytes": sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file())}


def verify_ct2(source: ModelFolder, settings: ExportSettings, resolved: Resolved, folder: Path, probes: list[dict],
               log=print) -> dict:
    """The CTranslate2 folder against the Hugging Face model (see the module docstring)."""
    from finetuneflow.ship import parity
    from finetuneflow.contract.decoding import GenerationSettings
    from finetuneflow.model.loading import load_model
    quantization = settings.quantization.lower()
    reference = source.reference_model()
    exported = load_model(str(folder))   # through the same hook inference and the HTTP service use
    instruction, limit = resolved.instruction, resolved.max_input_length
    items = parity.teacher_forced(reference, probes, instruction, limit)
    measured = parity.compare(parity.log_probs(reference, items), parity.log_probs(exported, items), "log_probs")
    theirs = parity.logits(exported, items, "all")
    if theirs is not None:
        ours = parity.logits(reference, items, "all")
        measured["argmax_agreement"] = parity.compare(ours, theirs)["argmax_agreement"]
    decoding = GenerationSettings.from_record(resolved.generation)   # CTranslate2 has beam search too
    ref = parity.summaries(reference, probes, decoding, instruction, limit, settings.batch_size)
    ours = parity.summaries(exported, probes, decoding, instruction, limit, settings.batch_size)
    rows, agreement = parity.side_by_side(probes, ref.summaries, ours.summaries, ("transformers", "ctranslate2"))
    report = parity.report("ct2", quantization, measured, probes, rows, agreement)
    log(f"verification (ctranslate2 vs transformers): {report.line()}")
    print_side_by_side(rows, ("transformers", "ctranslate2"), log)
    return {"passed": report.passed, "checks": {"ctranslate2": report.to_dict()}, "decoding": ours.settings,
            "timing": {"transformers": ref.timing(), "ctranslate2": ours.timing()}}


class CT2Exporter(Exporter):
    format, backend = "ct2", "ctranslate2"
    REPORT_FILES = {"json": "deploy_report.json", "html": "deploy_report.html"}

    def kinds(self, settings: ExportSettings) -> list[str]:
        return [settings.quantization.lower()]

    def targets(self, source: ModelFolder, settings: ExportSettings, name: str, kind: str) -> dict[str, Path]:
        out = settings.output_dir or f"{FT_OUTPUTS}/ct2/{name}-{kind}"
        return {"main": check_output_dir(out, stage=STAGE, inputs=[source.path], overwrite=settings.overwrite)}

    def report_paths(self, source, settings, name, targets) -> dict[str, Path]:
        """Inside the CT2 folder (replaced as a whole, so checked with it)."""
        folder = next(iter(targets.values()))["main"]
        return {key: folder / file for key, file in self.REPORT_FILES.items()}

    def deploy_paths(self, report_paths, staged) -> dict[str, Path]:
        folder = next(iter(staged.values()))
        return {key: folder / file for key, file in self.REPORT_FILES.items()}

    @contextmanager
    def staged(self, targets: dict[str, Path]):
        with replace_dir(targets["main"]) as tmp:
            yield tmp

    def convert(self, source: ModelFolder, settings: ExportSettings, staged: dict[str, Path], stack, log) -> dict:
        import torch
        out = {}
        for quantization, folder in staged.items():
            if quantization not in CPU_QUANTIZATIONS and not torch.cuda.is_available():
                log(f"note: {quantization} runs on GPUs; on this CPU CTranslate2 computes it in float32")
            conversion = convert_to_ct2(source.path, folder, quantization)
            log(f"converted: {conversion['bytes'] / 1e6:.1f} MB in {conversion['seconds']} s; vocabulary "
                f"{conversion['vocabulary']}")
            out[quantization] = conversion
        return out

    def verify(self, source, settings, resolved, kind, staged, probes, log) -> dict:
        return verify_ct2(source, settings, resolved, staged, probes, log)

    def artifact(self, source, kind, targets, staged):
        from finetuneflow.ship.deploy_gate import Artifact
        return Artifact(kind, staged, targets["main"], "ctranslate2")

    def publish(self, source, settings, resolved, kind, targets, staged, report, provenance) -> dict[str, str]:
        from transformers import AutoTokenizer
        from finetuneflow.model.prompts import prompt_style
        out = targets["main"]
        files = {"folder": str(out), "report": str(out / "export_report.json"), "record": str(out / "run_config.json")}
        usage = f"python inference_bart_lora.py --MODEL={out}   (or load_model('{out}') + summarize())"
        atomic_write_json(staged / "export_report.json", {**report, "quantization": kind,
                                                          "output_dir": str(out), "files": files, "usage": usage})
        record = exported_record(source, resolved, self.backend, {"format": "ct2", "quantization": kind,
                                                                  "conversion": report["conversion"]})
        record.prompt_style = prompt_style(AutoTokenizer.from_pretrained(staged))
        write_record(staged, record, provenance, [source.path])
        return files
