"""llama.cpp as a backend: a `.gguf` file (or a folder holding exactly one) is a model like any other.

The project's one generation loop (engine/generation.py `summarize`) encodes the prompts with
the Hugging Face tokenizer read from the GGUF metadata (`AutoTokenizer.from_pretrained(folder,
gguf_file=name)`), sorts and batches them, and hands each batch of token ids to
`LlamaCppBackend.generate_batch`, which decodes them with llama.cpp (llamacpp_runtime.py,
through llama-cpp-python 0.3.36; threads = the machine's cores, `FTF_LLAMA_THREADS` overrides).

Decoding is the engine's resolved decoding: greedy (or seeded sampling), `max_new`, `min_new`
(stop tokens masked until then), `no_repeat_ngram_size` over the generated tokens only
(transformers' `NoRepeatNGramLogitsProcessor` on each row's new tokens), stop at EOS and
end-of-turn tokens (`stop_token_ids`). Beam search is refused: llama.cpp has none.
DECODING=mbr: each row's greedy summary, then its samples decoded from a copy of its prompt's KV
cells (`CandidateChooser`: one generator per sample).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from finetuneflow.contract.decoding import ResolvedGeneration
from finetuneflow.contract.errors import UserError
from finetuneflow.model.backends import Backend, CandidateBatch, Capabilities, Generated, StepCallback
from finetuneflow.model.backends.llamacpp_bindings import (BINDINGS, INSTALL_HINT, bindings, default_threads,
                                                           find_gguf, gguf_file, gguf_record)
from finetuneflow.model.backends.llamacpp_runtime import LlamaCppModel
from finetuneflow.model.family import CAUSAL
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.loading import fix_tokenizer

__all__ = ["BACKEND", "CandidateChooser", "INSTALL_HINT", "LlamaCppBackend", "NAME", "TokenChooser"]
NAME = "llama.cpp"


# ---------------------------------------------------------------------------------------------
# choosing the next token: the engine's decoding rules

class TokenChooser:
    """The engine's decoding rules for one batch: greedy (or seeded sampling), `min_new` (stop
    tokens masked until then) and `no_repeat_ngram_size` over each row's generated tokens only,
    the rule of transformers' NoRepeatNGramLogitsProcessor (a token that would complete an n-gram
    already generated is banned) kept incrementally per row: torch calls per token cost more than
    a decode step on a small model, so the greedy path stays in numpy."""

    def __init__(self, decoding: ResolvedGeneration, stops: list[int]):
        self.min_new = decoding.min_new
        self.ngram = int(decoding.no_repeat_ngram_size or 0)
        self.stops = np.array(sorted(set(stops)), dtype=np.int64)
        self.seen: dict[int, dict[tuple, set]] = {}     # row -> (n-1)-gram -> tokens that followed it
        sampling = decoding.sampling
        temperature = sampling.temperature if sampling is not None else None
        # temperature 0 is greedy, as in the OpenAI API
        self.sample = sampling is not None and not (temperature is not None and float(temperature) <= 0)
        if self.sample:
            import torch
            from transformers import TemperatureLogitsWarper, TopPLogitsWarper
            self.warpers = []
            if temperature is not None and float(temperature) != 1.0:
                self.warpers.append(TemperatureLogitsWarper(float(temperature)))
            if sampling.top_p is not None and float(sampling.top_p) < 1.0:
                self.warpers.append(TopPLogitsWarper(float(sampling.top_p)))
            self.generator = torch.Generator().manual_seed(int(sampling.seed) if sampling.seed is not None else 0)

    def banned(self, row: int, generated: list[int]) -> set:
        n = self.ngram
        if not generated:   # a row starts (again): forget what an earlier row with this index generated
            self.seen.pop(row, None)
        if n <= 0 or len(generated) < n - 1:
            return set()
        table = self.seen.setdefault(row, {})
        if len(generated) >= n:   # record the n-gram the last token completed
            table.setdefault(tuple(generated[-n:-1]), set()).add(generated[-1])
        return table.get(tuple(generated[len(generated) - n + 1:]), set()) if n > 1 else table.get((), set())

    def __call__(self, row: int, generated: list[int], logits: np.ndarray) -> int:
        banned = self.banned(row, generated)
        masked = len(generated) < self.min_new and len(self.stops) > 0
        if not banned and not masked and not self.sample:
            return int(logits.argmax())
        scores = np.array(logits, dtype=np.float32)
        if masked:
            scores[self.stops] = -np.inf
        if banned:
            scores[list(banned)] = -np.inf
        if not self.sample:
            return int(scores.argmax())
        import torch
        ids = torch.tensor([generated], dtype=torch.long)
        tensor = torch.from_numpy(scores)[None]
        for warper in self.warpers:
            tensor = warper(ids, tensor)
        probs = torch.softmax(tensor[0].double(), -1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class CandidateChooser(TokenChooser):
    """MBR's samples: the TokenChooser rules (min_new, no_repeat_ngram_size) with one generator per
    candidate (model/backends/sampling.py), so a sample depends on its row's seed only."""

    def __init__(self, decoding: ResolvedGeneration, stops: list[int], row_seeds: list[int]):
        super().__init__(decoding.greedy_part(), stops)
        from finetuneflow.model.backends.sampling import CandidateDraws
        mbr = decoding.mbr
        self.draws = CandidateDraws(row_seeds, mbr.samples, mbr.temperature, mbr.top_p)

    def __call__(self, row: int, generated: list[int], logits: np.ndarray) -> int:
        import torch
        banned = self.banned(row, generated)
        scores = np.array(logits, dtype=np.float32)
        if len(generated) < self.min_new and len(self.stops) > 0:
            scores[self.stops] = -np.inf
        if banned:
            scores[list(banned)] = -np.inf
        return int(self.draws.draw(torch.from_numpy(scores)[None], [row])[0])


# ---------------------------------------------------------------------------------------------
# the backend

class LlamaCppBackend(Backend):
    """The backend seam (model/backends): detect, load, generate_batch, token_log_probs."""
    name = NAME
    capabilities = Capabilities(sampling=True, token_streaming=True)   # no beam search in llama.cpp

    def detect(self, path) -> bool:
        """A .gguf file, or a folder holding exactly one."""
        try:
            return find_gguf(path) is not None
        except OSError:
            return False

    def load(self, path, *, device=None, dtype=None, n_threads: int | None = None, verbose: bool = False,
             **options) -> LoadedModel:
        import torch
        bindings()
        file = gguf_file(path)
        n_gpu_layers = self._gpu_layers(device)
        runtime = LlamaCppModel(file, n_threads=n_threads or default_threads(), n_gpu_layers=n_gpu_layers,
                                verbose=verbose)
        file_dtype = runtime.file_type
        if dtype is not None and str(dtype).lower() not in (file_dtype, "auto"):
            runtime.close()
            raise UserError(f"{file.name} holds {file_dtype} weights; a GGUF's type is fixed when it is written "
                            f"(make a {dtype} file with finetuneflow.ship.quantize.quantize, or drop dtype)")
        try:
            config, tokenizer = self._hf_side(file, runtime.meta)
        except UserError:
            runtime.close()
            raise
        from transformers import GenerationConfig
        fix_tokenizer(tokenizer, CAUSAL, config)
        generation_config = GenerationConfig.from_model_config(config)
        runtime.config, runtime.generation_config = config, generation_config
        return LoadedModel(model=runtime, tokenizer=tokenizer, family=CAUSAL, backend=self, name=str(path),
                           base=str(file), adapter=None,
                           device=torch.device("cuda" if n_gpu_layers else "cpu"), dtype=file_dtype,
                           config=config, generation_config=generation_config, record=gguf_record(file))

    @staticmethod
    def _gpu_layers(device) -> int:
        llama_cpp = bindings()
        kind = str(device).split(":")[0] if device is not None else None
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        if kind in ("cuda", "gpu", "metal") and not gpu:
            raise UserError(f"device={device}: this llama-cpp-python build runs on the CPU only; reinstall it with "
                            f"CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall {BINDINGS}, or use "
                            f"device=cpu")
        return -1 if gpu and kind != "cpu" else 0

    @staticmethod
    def _hf_side(file: Path, meta: dict):
        """The Hugging Face config and tokenizer transformers reads from the GGUF metadata."""
        from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
        folder, name = str(file.parent), file.name
        arch = meta.get("general.architecture")
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
        except (ValueError, KeyError, OSError):
            # transformers cannot map this architecture's config; llama.cpp runs it anyway
            context = meta.get(f"{arch}.context_length")
            config = PretrainedConfig(max_position_embeddings=int(context) if context else None)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except (ValueError, KeyError, OSError, NotImplementedError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise UserError(f"transformers cannot read the tokenizer of {name} ({first}); the engine encodes prompts "
                            f"with it, so this GGUF cannot run here") from None
        return config, tokenizer

    def generate_batch(self, loaded, batch: list[list[int]], decoding: ResolvedGeneration,
                       on_step: StepCallback | None = None) -> list[Generated]:
        from finetuneflow.model.prompts import stop_token_ids
        if decoding.num_beams > 1:
            raise UserError(f"num_beams={decoding.num_beams}: the llama.cpp backend has no beam search (it decodes "
                            f"greedily, as llama.cpp and Ollama do); set NUM_BEAMS=1")
        stops = stop_token_ids(loaded.tokenizer)
        chooser = TokenChooser(decoding, stops)
        runtime: LlamaCppModel = loaded.model
        limit = bindings().llama_max_parallel_sequences() - 1   # sequence 0 holds the shared prefix
        out: list[Generated] = []
        for start in range(0, len(batch), limit):
            rows = batch[start:start + limit]
            step = None if on_step is None else (lambda row, token, at=start: on_step(at + row, token))
            out += runtime.generate([list(map(int, p)) for p in rows], chooser, decoding.max_new, set(stops), step)
        return out

    def generate_candidates(self, loaded, batch: list[list[int]], decoding: ResolvedGeneration,
                            seeds: list[int]) -> CandidateBatch:
        """DECODING=mbr: the greedy rows, then each row's samples from a copy of its prompt's KV cells
        (llamacpp_runtime.py `generate_candidates`), each sample with its own generator."""
        from finetuneflow.model.prompts import stop_token_ids
        stops = stop_token_ids(loaded.tokenizer)
        n = decoding.mbr.samples
        rows_per_call = (bindings().llama_max_parallel_sequences() - 1) // (1 + n)
        if rows_per_call < 1:
            raise UserError(f"MBR_SAMPLES={n}: llama.cpp decodes at most "
                            f"{bindings().llama_max_parallel_sequences() - 1} sequences together; lower MBR_SAMPLES")
        runtime: LlamaCppModel = loaded.model
        out, greedy_seconds, sample_seconds = [], 0.0, 0.0
        for start in range(0, len(batch), rows_per_call):
            prompts = [list(map(int, p)) for p in batch[start:start + rows_per_call]]
            chooser = TokenChooser(decoding.greedy_part(), stops)
            sampler = CandidateChooser(decoding, stops, seeds[start:start + rows_per_call])
            greedy, sampled, g, s = runtime.generate_candidates(prompts, chooser, sampler, n, decoding.max_new,
                                                                set(stops))
            out += [[row] + sampled[k * n:(k + 1) * n] for k, row in enumerate(greedy)]
            greedy_seconds, sample_seconds = greedy_seconds + g, sample_seconds + s
        return CandidateBatch(out, greedy_seconds, sample_seconds)

    def close(self, loaded) -> None:
        loaded.model.close()

    def token_log_probs(self, loaded, prompt_ids: list[int], target_ids: list[int]) -> list[float]:
        """log p(target_i | prompt, target_<i) for each target token (natural log, float64 softmax)."""
        if not target_ids:
            return []
        if not prompt_ids:
            raise UserError("token_log_probs needs at least one prompt token (the first target is predicted from it)")
        ids = list(map(int, prompt_ids)) + list(map(int, target_ids))
        logits = loaded.model.all_logits(ids[:-1], start=len(prompt_ids) - 1).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return [float(log_probs[i, t]) for i, t in enumerate(target_ids)]


BACKEND = LlamaCppBackend()
