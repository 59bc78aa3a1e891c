"""Verifying a GGUF file before it is written (ship/gguf_export.py's verify step).

Two readers load the converted file and the parity toolkit (ship/parity.py) judges each against
the Hugging Face model with THRESHOLDS[("gguf", outtype)]: transformers (`gguf_file=`, dequantized
to float32: teacher-forced logits at every prompt and summary position, the embedded tokenizer,
greedy summaries side by side) and, when llama-cpp-python is installed, llama.cpp itself
(`llama_cpp_check`). Both decode greedily, as llama.cpp and Ollama do. At least one reader must
judge the file, or the export is not written (`--VERIFY=False` writes it unverified).
"""
from __future__ import annotations

from pathlib import Path

import torch

from finetuneflow.contract.architectures import T5_TYPES
from finetuneflow.contract.errors import UserError
from finetuneflow.model.family import CAUSAL
from finetuneflow.model.loading import LoadedModel
from finetuneflow.ship import parity
from finetuneflow.ship.exporter import ExportSettings, Resolved, print_side_by_side
from finetuneflow.ship.source import ModelFolder


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
    """The GGUF run by llama.cpp itself (llama-cpp-python), when the bindings are installed: its
    teacher-forced logits at every probe position against transformers', and the probe
    summaries decoded greedily by the llama.cpp backend (the engine's loop: same prompt ids,
    stop at EOS / end-of-turn tokens, which is what `stops` names as text for Ollama)."""
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp)"}
    from finetuneflow.contract.decoding import GenerationSettings
    from finetuneflow.model.backends.llamacpp import BACKEND as backend
    loaded = backend.load(gguf_path, device="cpu")
    try:
        diffs, agree, positions = [], 0, 0
        for item in inputs:
            theirs = torch.from_numpy(loaded.model.all_logits(item["input_ids"][0].tolist()))
            ours = _logits(reference.model, item, reference.device)
            diffs.append(float((theirs - ours).abs().max()))
            agree += int((theirs.argmax(-1) == ours.argmax(-1)).sum())
            positions += theirs.shape[0]
        generated = backend.generate_batch(loaded, prompts, CAUSAL.resolve_generation(None, GenerationSettings(
            num_beams=1, max_new_tokens=max_new_tokens)))
        summaries = [reference.tokenizer.decode(g.ids, skip_special_tokens=True).strip() for g in generated]
    finally:
        loaded.model.close()
    return {"max_abs_logit_diff": max(diffs), "argmax_agreement": agree / positions, "positions": positions,
            "summaries": summaries, "finish_reasons": [g.finish_reason for g in generated],
            "runtime": f"llama-cpp-python {llama_cpp.__version__}, {loaded.model.n_threads} threads"}


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


def audit_gguf(source: ModelFolder, tokenizer, resolved: Resolved, gguf_path: Path, probes: list[dict],
               modelfile: str | None, log=print) -> dict:
    """The prompt and token audit (ship/gguf_audit.py) before any score: the GGUF's vocabulary,
    stop tokens, chat template and the Ollama Modelfile that ships with it against the evaluated
    model's tokenizer. A mismatch is one error line naming the differing token."""
    if source.family != CAUSAL:
        return {"skipped": "the prompt audit runs decoder-only GGUFs (llama.cpp's backend here has no encoder pass)"}
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp)"}
    from finetuneflow.ship.gguf_audit import PROBES, check_gguf, side_by_side_lines
    report = check_gguf(gguf_path, reference=tokenizer, instruction=resolved.instruction,
                        dialogues=[text for _, text in PROBES] + [p["dialogue"] for p in probes], forged_turn=True,
                        max_input_length=resolved.max_input_length, modelfile=modelfile,
                        max_new_tokens=resolved.max_new_tokens if modelfile else None)
    for line in side_by_side_lines(report):
        log(line)
    return report


class GGUFVerification:
    """Every GGUF type of one export against the Hugging Face model: the model's probe logits and
    summaries are computed once; each type is audited, then read back by transformers and by
    llama.cpp and judged (greedy on both sides: llama.cpp and Ollama decode greedily)."""

    def __init__(self, source: ModelFolder, settings: ExportSettings, resolved: Resolved, probes: list[dict]):
        self.source, self.settings, self.resolved, self.probes = source, settings, resolved, probes
        self._context = None

    def context(self) -> dict:
        if self._context is None:
            from finetuneflow.model.prompts import stop_token_ids
            reference = self.source.reference_model()
            instruction, limit, probes = self.resolved.instruction, self.resolved.max_input_length, self.probes
            items = parity.teacher_forced(reference, probes, instruction, limit)
            greedy = parity.greedy_settings(self.resolved.max_new_tokens,
                                            self.resolved.generation.get("min_new_tokens"))
            self._context = {
                "instruction": instruction, "limit": limit, "probes": probes, "items": items, "greedy": greedy,
                "expected": parity.logits(reference, items, "all"), "batch_size": self.settings.batch_size,
                "summaries": parity.summaries(reference, probes, greedy, instruction, limit,
                                              self.settings.batch_size).summaries,
                "stops": [reference.tokenizer.convert_ids_to_tokens(i)
                          for i in stop_token_ids(reference.tokenizer)]}
        return self._context

    def verify(self, outtype: str, gguf_path: Path, modelfile: str | None, log=print) -> dict:
        source, reference = self.source, self.source.reference_model()
        audit = audit_gguf(source, reference.tokenizer, self.resolved, gguf_path, self.probes, modelfile, log)
        context = self.context()
        checks = {"transformers": transformers_check(source, reference, gguf_path, outtype, context),
                  "llama_cpp": llama_cpp_judged(source, reference, gguf_path, outtype, context)}
        for name, check in checks.items():
            if "skipped" in check:
                log(f"{outtype}: {name} check skipped: {check['skipped']}")
            else:
                log(f"{outtype} verification ({name} reading the GGUF): "
                    f"{parity.ParityReport(**_fields(check)).line()}")
                print_side_by_side(check["probes"], ("transformers", "gguf" if name == "transformers" else name), log)
        judged = [c["passed"] for c in checks.values() if "passed" in c]
        verification = {"passed": all(judged) if judged else None, "checks": {"audit": audit, **checks},
                        "decoding": {"num_beams": 1, "max_new_tokens": self.resolved.max_new_tokens}}
        if not judged:
            verification["note"] = "; ".join(c["skipped"] for c in checks.values())
        return verification


def verify_gguf(source: ModelFolder, settings: ExportSettings, resolved: Resolved, gguf_path: Path,
                probes: list[dict], log=print) -> dict:
    """One GGUF file (settings.outtype[0]) against the Hugging Face model (see GGUFVerification)."""
    return GGUFVerification(source, settings, resolved, probes).verify(settings.outtype[0], gguf_path, None, log)


def _fields(check: dict) -> dict:
    return {k: check[k] for k in ("check", "key", "measured", "thresholds", "passed", "failures", "probes")}


