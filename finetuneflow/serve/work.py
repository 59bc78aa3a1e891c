"""What a request costs and how it runs: admission against the budgets, and the two engine calls
the scheduler makes (a batch of dialogues that fit; a long dialogue's map-reduce).

Cost is counted in *work tokens*: for every model call, the input tokens plus num_beams x the new
tokens (DECODING=mbr: 1 + MBR_SAMPLES candidates x the new tokens). A dialogue that fits costs its
input tokens + beams x MAX_NEW_TOKENS; a long one (LONG_INPUT = chunk) costs that for each window,
plus the calls that combine the partial summaries. The estimate is made before any work with an
exact token count of every dialogue; a request over REQUEST_TOKEN_BUDGET is refused up front (413),
and a long job is also stopped at run time when the tokens it really used pass the budget.
"""
from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass, replace

from finetuneflow.contract.decoding import LongInput, ResolvedGeneration
from finetuneflow.engine.generation import effective_settings, input_limit, summarize
from finetuneflow.engine.long_input import MAX_LEVELS, input_tokens, summarize_long
from finetuneflow.engine.windows import WINDOW_MARGIN
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.quality.mbr import choose_rows
from finetuneflow.serve.batching import Decoding, Job, Rejected
from finetuneflow.serve.options import ServerOptions
from finetuneflow.serve.prompting import prompted

_FILL = 0.85                                        # how full windows of whole turns are, on average
_SAFETY = 1.1                                       # a long dialogue's estimate errs high: the budget also stops it


@dataclass
class Plan:
    """A request's dialogues as the scheduler will run them."""
    tokens: list[int]        # input tokens each dialogue needs (with the prompt)
    long: list[bool]         # summarized in windows
    windows: list[int]       # estimated first-level windows (1: fits)
    cost: int                # estimated work tokens
    limit: int               # input tokens per model call


def estimate(tokens: int, overhead: int, limit: int, new_tokens: int, beams: int) -> tuple[int, int]:
    """(work tokens, first-level windows) of one dialogue needing `tokens` input tokens. Windows
    are packed from whole turns (assumed 85% full); a combining level packs whole partial
    summaries of up to new_tokens each, so when two do not fit a window it barely shrinks."""
    capacity = max(1, limit - overhead - WINDOW_MARGIN)
    if tokens <= limit:
        return tokens + beams * new_tokens, 1
    windows = count = math.ceil((tokens - overhead) / (capacity * _FILL))
    cost = (tokens - overhead) + count * (overhead + beams * new_tokens)
    for _ in range(1, MAX_LEVELS):
        joined = count * (new_tokens + 1)
        if joined + overhead <= limit:
            break
        per_window = capacity // (new_tokens + 1)
        count = math.ceil(count / per_window) if per_window else count * math.ceil((new_tokens + 1) / capacity)
        cost += joined + count * (overhead + beams * new_tokens)
    final = min(count * (new_tokens + 1), capacity) + overhead
    return cost + final + beams * new_tokens, windows


class Runner:
    """The loaded model, the server options, and a second tokenizer for admission counting (the
    model thread owns the model's own tokenizer: tokenizers are not safe to share across threads)."""

    def __init__(self, loaded: LoadedModel, options: ServerOptions):
        self.loaded, self.options = loaded, options
        self.long_input = LongInput.parse(options.long_input)
        self.counting = replace(loaded, tokenizer=copy.deepcopy(loaded.tokenizer))
        self._count_lock = threading.Lock()

    def resolved(self, decoding: Decoding) -> ResolvedGeneration:
        """A request's decoding over the model's defaults, as every engine call of it runs."""
        return effective_settings(self.loaded, decoding.settings, decoding.sampling_dict())

    def effective_new_tokens(self, decoding: Decoding) -> tuple[int, int]:
        """(max new tokens, beams) a request will really use; DECODING=mbr counts as 1 + MBR_SAMPLES
        beams (its candidates share the prompt, each generates its own new tokens)."""
        resolved = self.resolved(decoding)
        return resolved.max_new, (1 + resolved.mbr.samples) if resolved.mbr is not None else resolved.num_beams

    def limit(self, decoding: Decoding) -> int:
        return input_limit(self.loaded, decoding.settings, self.options.max_input_length)

    # -- admission (any thread but the model's) ----------------------------------------------
    def plan(self, dialogues: list[str], decoding: Decoding) -> Plan:
        """Count, classify and cost a request; Rejected (413/422) when it cannot be served."""
        limit = self.limit(decoding)
        with self._count_lock:
            counting = prompted(self.counting, decoding.prompt)
            tokens = input_tokens(counting, dialogues, self.options.instruction)
            overhead = counting.family.input_overhead(counting.tokenizer, counting.prompt(self.options.instruction))
        mode = LongInput("truncate") if decoding.prompt != "summary" else self.long_input
        new_tokens, beams = self.effective_new_tokens(decoding)
        long, windows, cost = [], [], 0
        for i, count in enumerate(tokens):
            over = count > limit
            if over and mode == "error":
                raise Rejected(422, "dialogue_too_long", f"dialogue {i} needs {count} input tokens, more than the "
                                                         f"model input of {limit} (the server runs LONG_INPUT=error)")
            if over and mode.windows and decoding.sampling:
                raise Rejected(422, "sampling_long_input", f"dialogue {i} needs {count} input tokens, more than the "
                                                           f"model input of {limit}, so it is summarized in windows; "
                                                           f"sampling is not available there: use temperature 0")
            chunked = over and mode.windows
            work, count_windows = estimate(count if chunked else min(count, limit), overhead, limit, new_tokens, beams)
            long.append(chunked)
            windows.append(count_windows)
            cost += math.ceil(work * (_SAFETY if chunked else 1))
        budget = self.options.request_token_budget
        if cost > budget:
            raise Rejected(413, "over_token_budget",
                           f"this request needs about {cost:,} work tokens ({len(dialogues)} dialogues, "
                           f"{sum(windows)} model inputs of up to {limit} tokens, {beams} beams x {new_tokens} new "
                           f"tokens each); the budget is {budget:,} per request (REQUEST_TOKEN_BUDGET): send fewer or "
                           f"shorter dialogues, or ask for fewer beams or new tokens")
        return Plan(tokens, long, windows, cost, limit)

    # -- the model thread ---------------------------------------------------------------------
    def short(self, texts: list[str], decoding: Decoding, sink=None):
        """One engine batch of dialogues that fit (or are truncated); `sink` hears each row's text
        as its tokens come and stops the rows nobody waits for (serve/streams.py BatchSink)."""
        options = self.options
        extra = {"sampling": decoding.sampling_dict()} if decoding.sampling else {}
        return summarize(prompted(self.loaded, decoding.prompt), texts, decoding.settings, options.batch_size,
                         self.limit(decoding), options.instruction, progress=False, chooser=choose_rows, sink=sink,
                         **extra)

    def long(self, job: Job, texts: list[str], control):
        """The map-reduce of long dialogues, one engine batch per turn."""
        options = self.options
        return summarize_long(self.loaded, texts, job.decoding.settings, options.batch_size,
                              options.max_input_length, options.instruction, mode=self.long_input, progress=False,
                              control=control, chooser=choose_rows)

    def sampling_available(self) -> bool:
        return self.loaded.backend.capabilities.sampling
