"""The CTranslate2 backend: a folder written by `export_gguf.py --FORMAT=ct2` runs like any model.

CTranslate2 runs BART/T5 (its `Translator`) and decoder-only models (its `Generator`) on CPU with
int8 weights, which is the fast CPU path that exists for seq2seq models (llama.cpp has no BART).
Such a folder has CTranslate2's model.bin, the tokenizer, generation_config.json and the Hugging
Face config as hf_config.json (ship/ct2_export.py writes it). The engine encodes prompts with the
tokenizer as for any model; this backend turns ids into CTranslate2 tokens and back, and maps the
engine's resolved decoding onto CTranslate2's options (seeded sampling too: the server's
temperature > 0 and DECODING=mbr's samples, `num_hypotheses` per row).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from finetuneflow.contract.decoding import ResolvedGeneration
from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.record import read_record
from finetuneflow.model.backends import Backend, CandidateBatch, Capabilities, Generated, StepCallback
from finetuneflow.model.family import CAUSAL, SEQ2SEQ, family_of
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.loading import load_tokenizer
from finetuneflow.model.prompts import stop_token_ids

HF_CONFIG = "hf_config.json"
QUANTIZATIONS = ("int8", "int8_float32", "float32", "int8_float16", "int8_bfloat16", "float16", "bfloat16")
CPU_QUANTIZATIONS = ("int8", "int8_float32", "float32")


def is_ct2_dir(path: Path) -> bool:
    """A folder with CTranslate2's model.bin (a Hugging Face config.json always has model_type)."""
    if not (path / "model.bin").is_file():
        return False
    config = path / "config.json"
    try:
        return not config.is_file() or "model_type" not in json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _hf_config(folder: Path):
    from transformers import AutoConfig
    data = json.loads((folder / HF_CONFIG).read_text(encoding="utf-8"))
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def _token(tokenizer, token_id) -> str | None:
    return None if token_id is None else tokenizer.convert_ids_to_tokens(int(token_id))


def _first(value):
    return value[0] if isinstance(value, list) else value


def seeded_runtime(loaded: LoadedModel, seed: int):
    """A copy of the model whose sampler starts from `seed`. CTranslate2 seeds a worker thread's
    random generator once, when the model is loaded (ctranslate2.set_random_seed before it), so a
    seeded sampling call loads its own copy (freed after the call): the cost of repeatable samples."""
    import ctranslate2
    runtime = loaded.model
    ctranslate2.set_random_seed(int(seed) % (1 << 31))
    return type(runtime)(str(loaded.base), device=runtime.device, compute_type=runtime.compute_type,
                         intra_threads=int(os.environ.get("FTF_CT2_THREADS", "0")))


class CT2Backend(Backend):
    name = "ctranslate2"
    capabilities = Capabilities(beams=True, sampling=True, token_streaming=True)

    def detect(self, path: Path) -> bool:
        return path.is_dir() and is_ct2_dir(path)

    def load(self, source, *, device=None, dtype=None, compute_type: str = "default", **options) -> LoadedModel:
        try:
            import ctranslate2
        except ImportError:
            raise UserError(f"{source} is a CTranslate2 model but ctranslate2 is not installed; "
                            f"pip install ctranslate2") from None
        from transformers import GenerationConfig
        folder = Path(source)
        missing = [f for f in (HF_CONFIG, "tokenizer_config.json") if not (folder / f).is_file()]
        if missing:
            raise UserError(f"{folder} is a CTranslate2 model without {', '.join(missing)}; re-export it with "
                            f"`python export_gguf.py --FORMAT=ct2` so it carries its tokenizer and config")
        config = _hf_config(folder)
        family = family_of(config)
        wanted = str(device or ("cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"))
        ct2_device = "cuda" if wanted.startswith("cuda") and ctranslate2.get_cuda_device_count() > 0 else "cpu"
        generation = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").is_file() \
            else GenerationConfig.from_model_config(config)
        tokenizer = load_tokenizer(str(folder), family, config)
        threads = int(os.environ.get("FTF_CT2_THREADS", "0"))   # 0 = CTranslate2's default
        runtime_class = ctranslate2.Translator if family == SEQ2SEQ else ctranslate2.Generator
        try:
            runtime = runtime_class(str(folder), device=ct2_device, compute_type=compute_type, intra_threads=threads)
        except (RuntimeError, ValueError) as exc:   # a corrupt or truncated model.bin
            raise UserError(f"CTranslate2 cannot load {folder}: {first_line(exc, 300)}; re-export it") from None
        return LoadedModel(model=runtime, tokenizer=tokenizer, family=family, backend=self, name=str(source),
                           base=str(folder), device=ct2_device, dtype=runtime.compute_type, config=config,
                           generation_config=generation, record=read_record(folder))

    # -- generation ----------------------------------------------------------------------------
    def options(self, loaded: LoadedModel, decoding: ResolvedGeneration) -> dict:
        """The engine's resolved decoding in CTranslate2's terms (sampling: the whole vocabulary,
        top-p and temperature; seeded with ctranslate2.set_random_seed by the caller)."""
        penalty = decoding.length_penalty
        options = {"beam_size": decoding.num_beams, "no_repeat_ngram_size": int(decoding.no_repeat_ngram_size or 0),
                   "length_penalty": float(penalty if penalty is not None else 1.0), "sampling_topk": 1}
        if decoding.sampling is not None:
            sampling = decoding.sampling
            options.update(beam_size=1, sampling_topk=0, sampling_topp=float(sampling.top_p or 1.0),
                           sampling_temperature=float(sampling.temperature or 1.0))
        if loaded.family == CAUSAL:
            return {**options, "max_length": decoding.max_new, "min_length": decoding.min_new}
        # new tokens: transformers counts the decoder start token in max_length/min_length, CT2 does not
        # (the family resolved max_new/min_new without it)
        return {**options, "max_decoding_length": decoding.max_new, "min_decoding_length": decoding.min_new,
                "max_input_length": 0}

    def generate_batch(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration,
                       on_step: StepCallback | None = None) -> list[Generated]:
        """Token ids without the end token; counted as the transformers engine counts them: up to and
        including the first stop token, which transformers also emits when it forces EOS."""
        runtime = None
        if decoding.sampling is not None:
            runtime = seeded_runtime(loaded, decoding.sampling.seed or 0)
        return [row[0] for row in self._run(loaded, batch, decoding, runtime=runtime, on_step=on_step)]

    def generate_candidates(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration,
                            seeds: list[int]) -> CandidateBatch:
        """DECODING=mbr: the greedy rows (as generate_batch), then `samples` hypotheses per row in one
        sampling call (CTranslate2 runs a Translator's encoder once for a row's hypotheses; a
        Generator's prompt is its decoder's prefix). CTranslate2 has one random generator, so the
        call is seeded from the batch's row seeds (`seeded_runtime`): a row's samples depend on its
        batch, which is the same in every process of a sharded run."""
        started = time.perf_counter()
        greedy = self.generate_batch(loaded, batch, decoding.greedy_part())
        greedy_seconds = time.perf_counter() - started
        batch_seed = int.from_bytes(hashlib.sha256(",".join(map(str, seeds)).encode()).digest()[:4], "little") >> 1
        samples = self._run(loaded, batch, decoding.samples_part(batch_seed), decoding.mbr.samples,
                            runtime=seeded_runtime(loaded, batch_seed))
        return CandidateBatch([[g] + rows for g, rows in zip(greedy, samples)], greedy_seconds,
                              time.perf_counter() - started - greedy_seconds)

    def _run(self, loaded: LoadedModel, batch: list[list[int]], decoding: ResolvedGeneration,
             hypotheses: int = 1, runtime=None, on_step: StepCallback | None = None) -> list[list[Generated]]:
        """`hypotheses` results per row (generate_batch: one), on `runtime` (default: the model's);
        `on_step` hears each row's tokens through CTranslate2's step callback (one beam only;
        returning True stops that row)."""
        tokenizer, runtime = loaded.tokenizer, runtime or loaded.model
        options = {**self.options(loaded, decoding), "num_hypotheses": hypotheses}
        if on_step is not None and options["beam_size"] == 1 and hypotheses == 1:
            options["callback"] = lambda step: bool(on_step(step.batch_id, step.token_id))
        tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in batch]
        if loaded.family == CAUSAL:
            stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
            results = runtime.generate_batch(tokens, include_prompt_in_result=False, end_token=stops, **options)
            limit = options["max_length"]
            return [[Generated(list(ids), len(ids) + (len(ids) < limit), "stop" if len(ids) < limit else "length")
                     for ids in r.sequences_ids] for r in results]
        generation = loaded.generation_config
        forced_bos = _token(tokenizer, getattr(generation, "forced_bos_token_id", None))
        prefix = [[forced_bos] for _ in tokens] if forced_bos else None
        eos = _token(tokenizer, _first(generation.eos_token_id))
        forced_eos = getattr(generation, "forced_eos_token_id", None) is not None
        if forced_eos:
            # transformers forces EOS (log-prob 0) as the last of max_length tokens: the same as stopping
            # one token earlier, which also ranks beams that reach the limit the same way
            limit = max(1, options["max_decoding_length"] - 1)
            options = {**options, "max_decoding_length": limit,
                       "min_decoding_length": min(options["min_decoding_length"], limit)}
        results = runtime.translate_batch(tokens, target_prefix=prefix, end_token=eos, **options)
        limit = options["max_decoding_length"]
        out = []
        for result in results:
            row = []
            for hypothesis in result.hypotheses:
                ids = tokenizer.convert_tokens_to_ids(hypothesis)
                stopped = forced_eos or len(ids) < limit
                row.append(Generated(ids, len(ids) + stopped, "stop" if len(ids) < limit else "length"))
            out.append(row)
        return out

    # -- scoring -------------------------------------------------------------------------------
    def token_log_probs(self, loaded: LoadedModel, prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        """Teacher-forced log-probabilities of `target_ids` (aligned with the transformers backend's)."""
        tokenizer, runtime = loaded.tokenizer, loaded.model
        if loaded.family == CAUSAL:
            scores = list(runtime.score_batch([tokenizer.convert_ids_to_tokens(prompt_ids + target_ids)])[0].log_probs)
            return scores[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(target_ids)]
        eos = _first(loaded.generation_config.eos_token_id)
        target = target_ids[:-1] if target_ids and target_ids[-1] == eos else target_ids   # CT2 appends the end
        source = tokenizer.convert_ids_to_tokens(prompt_ids)
        scores = list(runtime.score_batch([source], [tokenizer.convert_ids_to_tokens(target)])[0].log_probs)
        return scores[:len(target_ids)]

    def logits(self, loaded: LoadedModel, prompt_ids: list[int], target_ids: list[int]):
        """Decoder-only models: CTranslate2's Generator returns full logits; its Translator does not."""
        if loaded.family != CAUSAL:
            return None
        import numpy as np
        tokens = loaded.tokenizer.convert_ids_to_tokens(prompt_ids + target_ids)
        return np.array(loaded.model.forward_batch([tokens]), dtype=np.float32)[0]


BACKEND = CT2Backend()
