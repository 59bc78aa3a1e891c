"""llama.cpp as a backend: a `.gguf` file (or a folder holding exactly one) is a model like any other.

The project's one generation loop (engine/generation.py `summarize`) encodes the prompts with
the Hugging Face tokenizer read from the GGUF metadata (`AutoTokenizer.from_pretrained(folder,
gguf_file=name)`), sorts and batches them, and hands each batch of token ids to
`LlamaCppBackend.generate_batch`, which decodes them with llama.cpp through llama-cpp-python
(0.3.36, its low-level bindings: model, context, batch, memory).

How a batch is decoded, and why it is fast on a CPU:
- all rows of a batch run as parallel sequences of one llama.cpp context (one `llama_decode`
  per step for the whole batch, so the weights are read once per step, not once per row);
- the prompt prefix the rows share (chat template + instruction: the same for every row) is
  decoded once into sequence 0 and copied into each row's sequence (a unified KV cache shares
  the cells); it stays cached between batches and only the part that changed is recomputed;
- threads = the machine's cores (`FTF_LLAMA_THREADS` overrides), `n_batch` = the whole context
  so a batch of prompts goes in one call, logits only where a token is chosen.

Decoding is the engine's: greedy (or seeded sampling when `do_sample` is set), `max_new_tokens`,
`min_new_tokens` (stop tokens masked until then), `no_repeat_ngram_size` over the generated
tokens only (transformers' `NoRepeatNGramLogitsProcessor` on each row's new tokens), stop at
EOS and end-of-turn tokens (`stop_token_ids`). Beam search is refused: llama.cpp has none.

Rows decoded together can differ from the same rows decoded alone in the last bits of their
logits (other matrix shapes), exactly like padded batches in transformers.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import re
import sys
import weakref
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.record import RunRecord, read_record
from finetuneflow.model.backends import Backend, Generated
from finetuneflow.model.family import CAUSAL
from finetuneflow.model.loading import LoadedModel, fix_tokenizer

NAME = "llama.cpp"
BINDINGS = "llama-cpp-python==0.3.36"
INSTALL_HINT = f"run `make install-llama` or `pip install {BINDINGS}`"
GGUF_MAGIC = b"GGUF"
# Encoder-decoder architectures: llama.cpp has no BART at all and runs T5 only through its
# encoder API, which this decoder-only backend does not drive; CTranslate2 serves both.
ENCODER_DECODER = ("t5", "t5encoder", "bart", "mbart", "pegasus", "marian", "led")
CONTEXT_STEP = 512          # the KV cache grows in steps of this many cells
SCORE_CHUNK = 256           # tokens per decode call when scoring (logits of every position)
GGML_TYPE_F32 = 0

# ---------------------------------------------------------------------------------------------
# bindings and llama.cpp's log

def bindings():
    """The llama_cpp module, or one line saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"the llama.cpp backend needs llama-cpp-python, which is not installed: "
                        f"{INSTALL_HINT}") from None
    return llama_cpp


_LOG: deque = deque(maxlen=2000)
_CALLBACK = None


@contextmanager
def llama_log(verbose: bool = False):
    """llama.cpp's log goes to stderr only when `verbose`; warnings and errors are kept in _LOG,
    so a failed load can be explained in one line."""
    global _CALLBACK
    llama_cpp = bindings()
    if _CALLBACK is None:
        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            message = text.decode("utf-8", "replace")
            if level >= 3:     # GGML_LOG_LEVEL_WARN (3), ERROR (4), CONT (5)
                _LOG.append(message.strip())
            if _CALLBACK.verbose:
                sys.stderr.write(message)
        callback.verbose = False
        _CALLBACK = callback
    _LOG.clear()
    _CALLBACK.verbose = verbose
    llama_cpp.llama_log_set(_CALLBACK, ctypes.c_void_p(0))
    try:
        yield _LOG
    finally:
        from llama_cpp import _logger   # back to llama-cpp-python's own callback, quiet below ERROR
        if _logger.logger.level == 0:
            _logger.set_verbose(False)
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _load_error(log) -> str:
    """The line of llama.cpp's log that says why a load failed: the loader's own reason, or the
    GGUF parser's when the loader only says that it failed."""
    errors = [line for line in log if "error" in line.lower() or "failed" in line.lower()]
    reasons = [line.split("error loading model:", 1)[1].strip() for line in errors if "error loading model:" in line]
    reasons = [r for r in reasons if not r.startswith("llama_model_loader: failed to load model from")]
    parser = [line.split(":", 1)[1].strip() for line in errors if line.startswith("gguf_init")]
    best = (reasons or parser or [line for line in errors if "failed to load model" not in line] or errors or [""])[0]
    return best or "llama.cpp could not load it"


# ---------------------------------------------------------------------------------------------
# files

def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: itself, or the only .gguf in a folder; None otherwise."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if path.is_dir():
        found = sorted(p for p in path.glob("*.gguf") if p.is_file() and not p.name.startswith("."))
        return found[0] if len(found) == 1 else None
    return None


def gguf_file(path: str | Path) -> Path:
    """The GGUF to load, or one line saying what is wrong with `path`."""
    from finetuneflow.contract.paths import resolve
    path = resolve(path)
    if not path.exists():
        raise UserError(f"GGUF file not found: {path} (export one with `python export_gguf.py`, or pass a .gguf "
                        f"from Ollama, LM Studio or llama.cpp)")
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.gguf") if p.is_file() and not p.name.startswith("."))
        if len(found) != 1:
            what = "no .gguf file" if not found else f"{len(found)} .gguf files ({', '.join(found[:4])})"
            raise UserError(f"{path} holds {what}; pass the .gguf file itself")
        path = path / found[0]
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf file")
    return path


def file_type_name(meta: dict) -> str:
    """"q8_0", "q4_k_m", "f16", "f32", ... from general.file_type (llama.cpp's llama_ftype)."""
    import gguf
    try:
        name = gguf.LlamaFileType(int(meta.get("general.file_type"))).name
    except (TypeError, ValueError):
        return "unknown"
    return name.replace("MOSTLY_", "").replace("ALL_", "").lower()


def _architecture(path: Path) -> str | None:
    """general.architecture read by gguf-py (used when llama.cpp refused the file: slow on large
    vocabularies, so not on the normal path, where llama.cpp's own metadata is used)."""
    try:
        import gguf
        field = gguf.GGUFReader(str(path)).fields.get("general.architecture")
        return field.contents() if field is not None else None
    except Exception:   # truncated or corrupt: llama.cpp's message says it
        return None


def refuse_architecture(name: str, arch: str | None) -> None:
    if arch in ENCODER_DECODER:
        kind = arch.upper()
        raise UserError(f"{name} is a {kind} GGUF (encoder-decoder): the llama.cpp backend runs decoder-only models "
                        f"(llama.cpp has no BART; its T5 needs an encoder pass this backend does not run); serve "
                        f"{kind} with CTranslate2: python export_gguf.py --MODEL=<merged model folder> --FORMAT=ct2")


def _record(path: Path) -> RunRecord | None:
    """The run record export_gguf.py wrote beside the file (`<stem>.run_config.json`), if any."""
    return read_record(path.parent, f"{path.stem}.run_config.json") or read_record(path.parent)


def default_threads() -> int:
    value = os.environ.get("FTF_LLAMA_THREADS")
    if value:
        if not value.strip().isdigit() or int(value) < 1:
            raise UserError(f"FTF_LLAMA_THREADS={value!r} is not a positive whole number of threads")
        return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# the runtime: one llama.cpp model, a generation context sized on demand, a scoring context

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
                reason = _load_error(log)
                refuse_architecture(path.name, _architecture(path))
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
                                f"{self.path.name}: {_load_error(log)}; use a smaller batch size") from None

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

    def generate(self, prompts: list[list[int]], choose, max_new_tokens: int, stops: set[int]) -> list[Generated]:
        """Decode `prompts` as parallel sequences; `choose(row, generated, logits) -> token`."""
        try:
            return self._generate(prompts, choose, max_new_tokens, stops)
        except _NoKVSlot:
            # the cache is sized for the batch, but freed cells can be scattered: start from an empty cache
            self._llama_cpp.llama_memory_clear(self._llama_cpp.llama_get_memory(self._ctx.ctx), True)
            self._prefix = []
            try:
                return self._generate(prompts, choose, max_new_tokens, stops)
            except _NoKVSlot:
                raise RuntimeError(f"llama.cpp found no room in its KV cache for {len(prompts)} rows") from None

    def _generate(self, prompts, choose, max_new_tokens: int, stops: set[int]) -> list[Generated]:
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
        # unified KV cache: the prefix's cells serve every row; each row adds its tail and new tokens
        cells = len(shared) + sum(len(p) - len(shared) + max_new_tokens for p in prompts) + len(self._prefix)
        self._ensure_generation_context(cells, k + 1)
        ctx, batch = self._ctx, self._batch
        memory = llama_cpp.llama_get_memory(ctx.ctx)
        for seq in range(1, self._ctx_seqs):      # the rows of the previous batch
            llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
        keep = len(_common_prefix([self._prefix, shared]))
        if keep < len(self._prefix):
            llama_cpp.llama_memory_seq_rm(memory, 0, keep, -1)
        if keep < len(shared):
            self._decode(ctx, batch, [(t, keep + i, 0, False) for i, t in enumerate(shared[keep:])])
        self._prefix = list(shared)
        items, last = [], []
        for row, prompt in enumerate(prompts):
            if shared:
                llama_cpp.llama_memory_seq_cp(memory, 0, row + 1, -1, -1)
            tail = prompt[len(shared):]
            items += [(t, len(shared) + i, row + 1, i == len(tail) - 1) for i, t in enumerate(tail)]
            last.append(len(items) - 1)
        self._decode(ctx, batch, items)
        generated = [[] for _ in prompts]
        finished: list[str | None] = [None] * k
        position = [len(p) for p in prompts]
        index = dict(enumerate(last))     # row -> output index of its logits in the last decode
        while index:
            items, next_index = [], {}
            for row, i in index.items():
                token = int(choose(row, generated[row], self._logits(ctx, i)))
                generated[row].append(token)
                if token in stops:
                    finished[row] = "stop"
                elif len(generated[row]) >= max_new_tokens:
                    finished[row] = "length"
                else:
                    next_index[row] = len(items)
                    items.append((token, position[row], row + 1, True))
                    position[row] += 1
            if items:
                self._decode(ctx, batch, items)
            index = next_index
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


# ---------------------------------------------------------------------------------------------
# choosing the next token: the engine's decoding rules

class TokenChooser:
    """The engine's decoding rules for one batch: greedy (or seeded sampling), `min_new_tokens`
    (stop tokens masked until then) and `no_repeat_ngram_size` over each row's generated tokens
    only, the rule of transformers' NoRepeatNGramLogitsProcessor (a token that would complete an
    n-gram already generated is banned) kept incrementally per row: torch calls per token cost
    more than a decode step on a small model, so the greedy path stays in numpy."""

    def __init__(self, effective: dict, stops: list[int]):
        self.min_new = int(effective.get("min_new_tokens") or 0)
        self.ngram = int(effective.get("no_repeat_ngram_size") or 0)
        self.stops = np.array(sorted(set(stops)), dtype=np.int64)
        self.seen: dict[int, dict[tuple, set]] = {}     # row -> (n-1)-gram -> tokens that followed it
        self.sample = bool(effective.get("do_sample"))
        temperature = effective.get("temperature")
        if self.sample and temperature is not None and float(temperature) <= 0:
            self.sample = False   # temperature 0 is greedy, as in the OpenAI API
        if self.sample:
            import torch
            from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
            self.warpers = []
            if temperature is not None and float(temperature) != 1.0:
                self.warpers.append(TemperatureLogitsWarper(float(temperature)))
            if effective.get("top_k"):
                self.warpers.append(TopKLogitsWarper(int(effective["top_k"])))
            if effective.get("top_p") is not None and float(effective["top_p"]) < 1.0:
                self.warpers.append(TopPLogitsWarper(float(effective["top_p"])))
            seed = effective.get("seed")
            self.generator = torch.Generator().manual_seed(int(seed) if seed is not None else 0)

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


# ---------------------------------------------------------------------------------------------
# the backend

class LlamaCppBackend(Backend):
    """The backend seam (model/backends): detect, load, generate_batch, token_log_probs."""
    name = NAME

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
                           config=config, generation_config=generation_config, record=_record(file))

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

    def generate_batch(self, loaded, batch: list[list[int]], effective: dict) -> list[Generated]:
        from finetuneflow.model.prompts import stop_token_ids
        beams = int(effective.get("num_beams") or 1)
        if beams > 1:
            raise UserError(f"num_beams={beams}: the llama.cpp backend has no beam search (it decodes greedily, as "
                            f"llama.cpp and Ollama do); set NUM_BEAMS=1")
        max_new = int(effective.get("max_new_tokens") or 128)
        stops = stop_token_ids(loaded.tokenizer)
        chooser = TokenChooser(effective, stops)
        runtime: LlamaCppModel = loaded.model
        limit = bindings().llama_max_parallel_sequences() - 1   # sequence 0 holds the shared prefix
        out: list[Generated] = []
        for start in range(0, len(batch), limit):
            out += runtime.generate([list(map(int, p)) for p in batch[start:start + limit]], chooser, max_new,
                                    set(stops))
        return out

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
