"""The llama.cpp runtime behind the llama.cpp backend: one GGUF model, a generation context sized
on demand and a scoring context, driven through llama-cpp-python's low-level bindings (model,
context, batch, memory).

How a batch is decoded, and why it is fast on a CPU:
- all rows of a batch run as parallel sequences of one llama.cpp context (one `llama_decode`
  per step for the whole batch, so the weights are read once per step, not once per row);
- the prompt prefix the rows share (chat template + instruction: the same for every row) is
  decoded once into sequence 0 and copied into each row's sequence (a unified KV cache shares
  the cells); it stays cached between batches and only the part that changed is recomputed;
- `n_batch` = the whole context so a batch of prompts goes in one call, logits only where a
  token is chosen;
- DECODING=mbr (`generate_candidates`): after the greedy rows, each row's prompt cells are
  copied to its samples' sequences, which start from the prompt's saved last logits: the prompt
  is decoded once per row (`prompt_tokens` counts what was decoded).
Rows decoded together can differ from the same rows decoded alone in the last bits of their
logits (other matrix shapes), exactly like padded batches in transformers.
"""
from __future__ import annotations

import atexit
import ctypes
import re
import time
import weakref
from pathlib import Path

import numpy as np

from finetuneflow.contract.errors import UserError
from finetuneflow.model.backends import Generated
from finetuneflow.model.backends.llamacpp_bindings import (bindings, file_type_name, gguf_architecture, llama_log,
                                                           load_error, refuse_architecture)

CONTEXT_STEP = 512          # the KV cache grows in steps of this many cells
SCORE_CHUNK = 256           # tokens per decode call when scoring (logits of every position)
GGML_TYPE_F32 = 0


class LlamaCppModel:
    """A loaded GGUF: llama.cpp's model plus contexts created (and grown) as batches need them.

    `config` and `generation_config` are the Hugging Face objects read from the same GGUF, so
    code that asks `loaded.model.config` (context length) keeps working."""

    def __init__(self, path: Path, *, n_threads: int, n_gpu_layers: int, verbose: bool = False):
        llama_cpp = bindings()
        from llama_cpp import _internals
        self._llama_cpp, self._internals = llama_cpp, _internals
        self.path, self.verbose = path, verbose
        self.n_threads, self.n_gpu_layers = n_threads, n_gpu_layers
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        with llama_log(verbose) as log:
            try:
                self.model = _internals.LlamaModel(path_model=str(path), params=params, verbose=verbose)
            except ValueError:
                reason = load_error(log)
                refuse_architecture(path.name, gguf_architecture(path))
                unknown = re.search(r"unknown model architecture: '([^']+)'", reason)
                if unknown:
                    raise UserError(f"llama.cpp (llama-cpp-python 0.3.36) has no architecture {unknown.group(1)!r}, so "
                                    f"it cannot run {path.name}; use the model's Hugging Face folder") from None
                if any(word in reason for word in ("bounds", "failed to read", "corrupt", "incomplete")):
                    reason += "; the file is truncated or corrupt: re-download or re-export it"
                raise UserError(f"llama.cpp cannot load {path.name}: {reason}") from None
        self.meta = self.model.metadata()
        try:
            refuse_architecture(path.name, self.meta.get("general.architecture", "?"))
        except UserError:
            self.model.close()
            raise
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.n_ctx_train = self.model.n_ctx_train()
        self.file_type = file_type_name(self.meta)
        # one KV buffer for all rows: the shared prefix is stored once (measured no slower than one
        # stream per row on SmolLM2-135M / DialogSum, where the prefix is ~15% of a prompt)
        self.kv_unified = True
        self.kv_type = GGML_TYPE_F32 if self.file_type == "f32" else None   # f32 files: an f32 KV cache, exact
        self.config = None
        self.generation_config = None
        self._ctx = None            # generation context
        self._ctx_cells = self._ctx_seqs = 0
        self._batch = None
        self._prefix: list[int] = []    # tokens of sequence 0 (the shared prompt prefix) in the cache
        self._score_ctx = None
        self._score_cells = 0
        self._score_batch = None
        self.prompt_tokens = 0          # prompt tokens decoded for generation (the shared prefix counted once)
        _OPEN.add(self)

    # contexts ---------------------------------------------------------------------------------
    def _new_context(self, cells: int, seqs: int, outputs_per_seq: int, n_batch: int):
        llama_cpp = self._llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = cells
        params.n_batch = n_batch
        params.n_ubatch = min(512, n_batch)
        params.n_seq_max = seqs
        params.n_outputs_max_per_seq = outputs_per_seq
        params.n_threads = params.n_threads_batch = self.n_threads
        params.kv_unified = self.kv_unified
        params.no_perf = True
        if self.kv_type is not None:
            params.type_k = params.type_v = self.kv_type
            params.flash_attn_type = 0    # llama.cpp's CPU flash attention rounds through f16
        with llama_log(self.verbose) as log:
            try:
                return self._internals.LlamaContext(model=self.model, params=params, verbose=self.verbose)
            except ValueError:
                raise UserError(f"llama.cpp could not create a context of {cells} tokens x {seqs} sequences for "
                                f"{self.path.name}: {load_error(log)}; use a smaller batch size") from None

    def _ensure_generation_context(self, cells: int, seqs: int) -> None:
        if self._ctx is not None and cells <= self._ctx_cells and seqs <= self._ctx_seqs:
            return
        cells = max(cells, self._ctx_cells)
        cells = -(-cells // CONTEXT_STEP) * CONTEXT_STEP
        seqs = max(seqs, self._ctx_seqs)
        self._close_generation()
        self._ctx = self._new_context(cells, seqs, 1, cells)
        self._batch = self._llama_cpp.llama_batch_init(cells, 0, 1)
        self._ctx_cells, self._ctx_seqs, self._prefix = cells, seqs, []

    def _close_generation(self):
        if self._batch is not None:
            self._llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    def close(self) -> None:
        self._close_generation()
        if self._score_batch is not None:
            self._llama_cpp.llama_batch_free(self._score_batch)
            self._score_batch = None
        if self._score_ctx is not None:
            self._score_ctx.close()
            self._score_ctx = None
        if getattr(self, "model", None) is not None:
            self.model.close()
            self.model = None
        _OPEN.discard(self)

    # decoding ---------------------------------------------------------------------------------
    @staticmethod
    def _fill(batch, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        b = batch.contents if hasattr(batch, "contents") else batch
        b.n_tokens = len(items)
        for j, (token, pos, seq, logits) in enumerate(items):
            b.token[j] = token
            b.pos[j] = pos
            b.seq_id[j][0] = seq
            b.n_seq_id[j] = 1
            b.logits[j] = logits

    def _decode(self, ctx, batch, items) -> None:
        self._fill(batch, items)
        code = self._llama_cpp.llama_decode(ctx.ctx, batch)
        if code == 1:
            raise _NoKVSlot()
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code} ({len(items)} tokens)")

    def _logits(self, ctx, index: int) -> np.ndarray:
        pointer = self._llama_cpp.llama_get_logits_ith(ctx.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def generate(self, prompts: list[list[int]], choose, max_new_tokens: int, stops: set[int],
                 on_step=None) -> list[Generated]:
        """Decode `prompts` as parallel sequences; `choose(row, generated, logits) -> token`;
        `on_step(row, token)` hears each row's every token as it is chosen (True: stop the row)."""
        return self._retrying(prompts, lambda: self._run(prompts, choose, max_new_tokens, stops, on_step=on_step)[0])

    def generate_candidates(self, prompts: list[list[int]], choose, sample_choose, samples: int,
                            max_new_tokens: int, stops: set[int]):
        """DECODING=mbr: the greedy rows exactly as `generate` decodes them, then `samples` more
        sequences per row that start from a copy of the row's prompt cells (llama_memory_seq_cp: no
        prompt token is decoded again) and from the prompt's last logits, choosing with
        `sample_choose(candidate, generated, logits)` (candidate = row * samples + j). Returns
        (greedy rows, sampled rows in that order, greedy seconds, sample seconds)."""
        return self._retrying(prompts, lambda: self._run(prompts, choose, max_new_tokens, stops, samples,
                                                         sample_choose))

    def forget_prefix(self) -> None:
        """Empty the KV cache: the next batch decodes its shared prompt prefix again."""
        if self._ctx is not None:
            self._llama_cpp.llama_memory_clear(self._llama_cpp.llama_get_memory(self._ctx.ctx), True)
        self._prefix = []

    def _retrying(self, prompts, call):
        try:
            return call()
        except _NoKVSlot:
            # the cache is sized for the batch, but freed cells can be scattered: start from an empty cache
            self.forget_prefix()
            try:
                return call()
            except _NoKVSlot:
                raise RuntimeError(f"llama.cpp found no room in its KV cache for {len(prompts)} rows") from None

    def _prompts(self, prompts, max_new_tokens: int, samples: int) -> list[int]:
        """Decode the prompts into sequences 1..k (their shared prefix once, in sequence 0, copied to
        each); the output index of each row's last prompt token."""
        llama_cpp = self._llama_cpp
        k = len(prompts)
        if any(not p for p in prompts):
            raise UserError("an empty prompt cannot be decoded")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.n_ctx_train:
            raise UserError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds {self.path.name}'s "
                            f"context of {self.n_ctx_train} tokens; lower MAX_INPUT_LENGTH or MAX_NEW_TOKENS")
        # the prefix every row shares (at least one token of each row stays to be decoded for its logits)
        shared = _common_prefix(prompts)[:min(len(p) for p in prompts) - 1]
        # unified KV cache: the prefix's cells serve every row; each row adds its tail and new tokens, and
        # each of its samples only new tokens (they share the row's prompt cells)
        cells = len(shared) + sum(len(p) - len(shared) + max_new_tokens * (1 + samples) for p in prompts) \
            + len(self._prefix)
        self._ensure_generation_context(cells, k * (1 + samples) + 1)
        ctx, batch = self._ctx, self._batch
        memory = llama_cpp.llama_get_memory(ctx.ctx)
        for seq in range(1, self._ctx_seqs):      # the rows of the previous batch
            llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
        keep = len(_common_prefix([self._prefix, shared]))
        if keep < len(self._prefix):
            llama_cpp.llama_memory_seq_rm(memory, 0, keep, -1)
        if keep < len(shared):
            self._decode(ctx, batch, [(t, keep + i, 0, False) for i, t in enumerate(shared[keep:])])
            self.prompt_tokens += len(shared) - keep
        self._prefix = list(shared)
        items, last = [], []
        for row, prompt in enumerate(prompts):
            if shared:
                llama_cpp.llama_memory_seq_cp(memory, 0, row + 1, -1, -1)
            tail = prompt[len(shared):]
            items += [(t, len(shared) + i, row + 1, i == len(tail) - 1) for i, t in enumerate(tail)]
            last.append(len(items) - 1)
        self._decode(ctx, batch, items)
        self.prompt_tokens += len(items)
        return last

    def _run(self, prompts, choose, max_new_tokens: int, stops: set[int], samples: int = 0, sample_choose=None,
             on_step=None):
        """(greedy rows, sampled rows, greedy seconds, sample seconds); see generate_candidates."""
        started = time.perf_counter()
        last = self._prompts(prompts, max_new_tokens, samples)
        ctx, k = self._ctx, len(prompts)
        first = {row: self._logits(ctx, i) for row, i in enumerate(last)}
        saved = {row: logits.copy() for row, logits in first.items()} if samples else {}
        greedy = self._decode_rows([row + 1 for row in range(k)], [len(p) for p in prompts], first, choose,
                                   max_new_tokens, stops, on_step)
        greedy_seconds = time.perf_counter() - started
        if not samples:
            return greedy, [], greedy_seconds, 0.0
        memory = self._llama_cpp.llama_get_memory(ctx.ctx)
        seqs, positions, firsts = [], [], {}
        for row, prompt in enumerate(prompts):
            for j in range(samples):
                seq = k + 1 + row * samples + j
                self._llama_cpp.llama_memory_seq_cp(memory, row + 1, seq, 0, len(prompt))
                firsts[len(seqs)] = saved[row]
                seqs.append(seq)
                positions.append(len(prompt))
        sampled = self._decode_rows(seqs, positions, firsts, sample_choose, max_new_tokens, stops)
        return greedy, sampled, greedy_seconds, time.perf_counter() - started - greedy_seconds

    def _decode_rows(self, seqs: list[int], positions: list[int], first: dict, choose, max_new_tokens: int,
                     stops: set[int], on_step=None) -> list[Generated]:
        """Decode one token per unfinished row and step until every row stops (`first`: row -> the
        logits its first token is chosen from; row r decodes in sequence seqs[r] from positions[r];
        `on_step`: see `generate`, a row it stops ends there)."""
        ctx, batch = self._ctx, self._batch
        generated = [[] for _ in seqs]
        finished: list[str | None] = [None] * len(seqs)
        position = list(positions)
        current = first
        while current:
            items, rows = [], []
            for row, logits in current.items():
                token = int(choose(row, generated[row], logits))
                generated[row].append(token)
                if token in stops:
                    finished[row] = "stop"
                elif on_step is not None and on_step(row, token):
                    finished[row] = "length"          # its consumer left: cut here
                elif len(generated[row]) >= max_new_tokens:
                    finished[row] = "length"
                else:
                    rows.append(row)
                    items.append((token, position[row], seqs[row], True))
                    position[row] += 1
            if items:
                self._decode(ctx, batch, items)
            current = {row: self._logits(ctx, j) for j, row in enumerate(rows)}
        return [Generated(ids=g[:-1] if reason == "stop" else list(g), counted=len(g), finish_reason=reason)
                for g, reason in zip(generated, finished)]

    def all_logits(self, ids: list[int], start: int = 0) -> np.ndarray:
        """Logits after each of ids[start:] (row j predicts ids[start + j + 1]), float32 [n, vocab]."""
        llama_cpp = self._llama_cpp
        if len(ids) > self.n_ctx_train:
            raise UserError(f"{len(ids)} tokens exceed {self.path.name}'s context of {self.n_ctx_train} tokens")
        if self._score_ctx is None or len(ids) > self._score_cells:
            if self._score_ctx is not None:
                llama_cpp.llama_batch_free(self._score_batch)
                self._score_ctx.close()
            cells = -(-len(ids) // CONTEXT_STEP) * CONTEXT_STEP
            self._score_ctx = self._new_context(cells, 1, SCORE_CHUNK, SCORE_CHUNK)
            self._score_batch = llama_cpp.llama_batch_init(SCORE_CHUNK, 0, 1)
            self._score_cells = cells
        ctx = self._score_ctx
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx.ctx), True)
        out = np.empty((len(ids) - start, self.n_vocab), dtype=np.float32)
        for begin in range(0, len(ids), SCORE_CHUNK):
            chunk = ids[begin:begin + SCORE_CHUNK]
            items = [(t, begin + i, 0, begin + i >= start) for i, t in enumerate(chunk)]
            self._decode(ctx, self._score_batch, items)
            for j, item in enumerate(items):
                if item[3]:
                    out[begin + j - start] = self._logits(ctx, j)
        return out

    # tokenizer side ---------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """llama.cpp's own tokenization (what llama-cli, llama-server and Ollama send)."""
        return self.model.tokenize(text.encode("utf-8"), add_special, parse_special)

    def token_text(self, token: int) -> str:
        return self.model.token_get_text(token)

    def is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> list[int]:
        return [t for t in range(self.n_vocab) if self.is_eog(t)]

    def chat_template(self) -> str | None:
        """The chat template stored in the GGUF (tokenizer.chat_template), as llama.cpp reads it."""
        raw = self._llama_cpp.llama_model_chat_template(self.model.model, None)
        return raw.decode("utf-8") if raw else None

    def builtin_chat(self, messages: list[dict], add_assistant: bool = True) -> str | None:
        """The prompt llama.cpp's built-in templates render (llama-cli without --jinja): the GGUF's
        template is matched to one llama.cpp knows; None when it matches none."""
        llama_cpp = self._llama_cpp
        template = self.chat_template()
        if not template:
            return None
        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
        chat = (llama_cpp.llama_chat_message * len(keep))(*[llama_cpp.llama_chat_message(r, c) for r, c in keep])
        size = 2 * sum(len(r) + len(c) for r, c in keep) + 1024
        for _ in range(2):
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(template.encode(), chat, len(keep), add_assistant, buffer, size)
            if n < 0:
                return None
            if n <= size:
                return buffer.raw[:n].decode("utf-8", "replace")
            size = n + 1
        return None

    def special_ids(self) -> dict:
        m = self.model
        return {"bos": m.token_bos(), "eos": m.token_eos(), "eot": m.token_eot(), "add_bos": bool(m.add_bos_token()),
                "add_eos": bool(m.add_eos_token())}

    def __repr__(self) -> str:
        return f"LlamaCppModel({self.path.name}, threads={self.n_threads}, gpu_layers={self.n_gpu_layers})"


class _NoKVSlot(Exception):
    """llama_decode returned 1: no free cells for the batch in the KV cache."""


_OPEN: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Free llama.cpp objects before interpreter shutdown (their __del__ fails once modules are gone)."""
    for runtime in list(_OPEN):
        try:
            runtime.close()
        except Exception:
            pass


def _common_prefix(rows: list[list[int]]) -> list[int]:
    if not rows:
        return []
    first, n = rows[0], min(len(r) for r in rows)
    for i in range(n):
        token = first[i]
        if any(r[i] != token for r in rows[1:]):
            return first[:i]
    return first[:n]
