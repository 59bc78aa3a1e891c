"""Generation during training, on a budget: what each evaluation generates and how it is scored.

* **Decoding, by family** (`resolve_generation`): NUM_BEAMS / MAX_NEW_TOKENS left at None take the
  family default. Seq2seq (BART, T5): the seed's 4 beams and 192 new tokens. Causal (Llama, Qwen,
  SmolLM, ...): greedy, and `CAUSAL_LENGTH_FACTOR` x the `CAUSAL_LENGTH_QUANTILE` quantile of the
  training summaries' tokens (EOS included), rounded up to a multiple of 8, at least
  `CAUSAL_MIN_NEW_TOKENS`, at most MAX_TARGET_LENGTH (the model never learned longer summaries).
  The resolved values and where they came from go into run_config.json, so later stages generate
  the same way.
* **A fixed, length-stratified subset** (`stratified_order`): EVAL_GENERATE_SAMPLES validation rows,
  one from each of that many equal-count length strata (input tokens), drawn with SEED, in an
  order whose every prefix spans the lengths (strata visited in van der Corput order). Every
  evaluation generates a prefix of this same list, so checkpoints are compared on the same rows.
  None = family default: every validation row for seq2seq (the seed's), `CAUSAL_EVAL_SAMPLES` for
  causal models.
* **A time budget** (EVAL_BUDGET_SECONDS): the first evaluation generates the subset in rounds of
  EVAL_BATCH_SIZE rows (x processes) and starts no round that would end past the budget (judged by
  the round before); the rows it finished - at least one round - are the rows of EVERY later
  evaluation (read back from the trainer's log history, so a resumed run keeps them). Later
  evaluations generate exactly those rows in one length-sorted pass, whatever time that takes
  (fine-tuned models write shorter summaries than zero-shot ones, so they are usually faster);
  the log line says when one ran over.
* **Scores**: ROUGE (rouge-score, as everywhere) and the unsupported-mention rate: the share of the
  generated summaries (those the check can read) with at least one name, number, time or amount
  the dialogue does not contain (quality/faithfulness.py, no encoder needed). It may steer
  checkpoint selection only where the validation benchmark shipped that check for dialogues of
  this length (`selection_columns()`, median words of the subset); elsewhere it is recorded, and
  selection falls back to ROUGE-L and says so.
"""
from __future__ import annotations

from dataclasses import replace

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.model.family import SEQ2SEQ

SEQ2SEQ_GENERATION = {"num_beams": 4, "max_new_tokens": 192}   # the seed's recipe (bart-large-cnn)
CAUSAL_LENGTH_QUANTILE = 0.95
CAUSAL_LENGTH_FACTOR = 1.25
CAUSAL_MIN_NEW_TOKENS = 16
CAUSAL_EVAL_SAMPLES = 24
RATE_KEY = "unsupported_mention_rate"
UNSUPPORTED_COLUMN = "unsupported_rate"      # the faithfulness column the check reads (selection_columns())


# ----------------------------------------------------------------------------- decoding defaults

def quantile(values: list[int], q: float) -> float:
    """The q-quantile of `values` (linear interpolation; 0 for no values)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def causal_new_tokens(summary_tokens: list[int], max_target_length: int) -> tuple[int, str]:
    """MAX_NEW_TOKENS for a causal model from the training summaries' lengths, and how it was found."""
    q = quantile(summary_tokens, CAUSAL_LENGTH_QUANTILE)
    value = int(math.ceil(q * CAUSAL_LENGTH_FACTOR / 8) * 8)
    value = max(CAUSAL_MIN_NEW_TOKENS, min(max_target_length, value))
    return value, (f"causal default: {CAUSAL_LENGTH_FACTOR} x the {int(CAUSAL_LENGTH_QUANTILE * 100)}th percentile "
                   f"of the {len(summary_tokens)} training summaries' tokens ({q:.0f}), rounded up to 8, within "
                   f"[{CAUSAL_MIN_NEW_TOKENS}, MAX_TARGET_LENGTH={max_target_length}]")


def resolve_generation(family: str, settings: GenerationSettings, summary_tokens: list[int],
                       max_target_length: int) -> tuple[GenerationSettings, dict]:
    """The decoding settings evaluations use (None -> the family default) and, per resolved
    setting, where its value came from."""
    beams, new_tokens, sources = settings.num_beams, settings.max_new_tokens, {}
    if beams is None and settings.decoding in ("greedy", "mbr"):
        beams, sources["num_beams"] = 1, f"DECODING={settings.decoding}"
    if beams is None and settings.decoding == "beam":
        beams, sources["num_beams"] = SEQ2SEQ_GENERATION["num_beams"], "DECODING=beam"
    if family == SEQ2SEQ:
        if beams is None:
            beams, sources["num_beams"] = SEQ2SEQ_GENERATION["num_beams"], "seq2seq default (the seed's)"
        if new_tokens is None:
            new_tokens = SEQ2SEQ_GENERATION["max_new_tokens"]
            sources["max_new_tokens"] = "seq2seq default (the seed's)"
    else:
        if beams is None:
            beams, sources["num_beams"] = 1, "causal default: greedy"
        if new_tokens is None:
            new_tokens, sources["max_new_tokens"] = causal_new_tokens(summary_tokens, max_target_length)
    # MIN_NEW_TOKENS over the resolved maximum fails here; DECODING and the MBR knobs are kept as asked
    resolved = replace(settings, num_beams=beams, max_new_tokens=new_tokens)
    return resolved, sources


# ----------------------------------------------------------------------------- the subset

def van_der_corput(j: int) -> float:
    value, denominator = 0.0, 1.0
    while j:
        denominator *= 2
        j, bit = divmod(j, 2)
        value += bit / denominator
    return value


def spread_order(n: int) -> list[int]:
    """0..n-1 in an order whose every prefix is spread over the range (van der Corput)."""
    order, seen, j = [], set(), 0
    while len(order) < n:
        k = min(n - 1, int(van_der_corput(j) * n))
        j += 1
        if k not in seen:
            seen.add(k)
            order.append(k)
    return order


def stratified_order(lengths: list[int], n: int | None, seed: int) -> list[int]:
    """Indices of `n` rows (0/None/more than there are = all), one per equal-count length
    stratum, drawn with `seed`, ordered so that every prefix spans the lengths."""
    rows = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    n = len(rows) if not n or n >= len(rows) else int(n)
    rng = random.Random(seed)
    picks = [rows[rng.randrange(k * len(rows) // n, (k + 1) * len(rows) // n)] for k in range(n)]
    return [picks[k] for k in spread_order(n)]


# ----------------------------------------------------------------------------- one evaluation

@dataclass
class GenerationEval:
    """What every evaluation generates from (the subset, in its fixed order) and how."""
    dialogues: list[str]
    references: list[str]
    settings: GenerationSettings
    batch_size: int
    max_input_length: int
    instruction: str
    family: str
    base: str
    tokenizer: object
    budget_seconds: float = 0.0                  # 0 = no limit
    rate_selectable: bool = True                 # the unsupported-mention check is shipped for these dialogues
    rate_note: str = ""


@dataclass
class Generated:
    """The summaries of the first `rows` subset rows and what they cost."""
    summaries: list[str]
    rows: int
    seconds: float
    generated_tokens: int
    budget_stopped: bool = False
    rounds: int = 1
    per_row: list[int] = field(default_factory=list)


def generate_rows(spec: GenerationEval, summarize_rows: Callable[[list[int]], tuple[list[str], int]],
                  fixed_rows: int | None, rank: int = 0, world: int = 1,
                  agree: Callable[[float], float] = lambda seconds: seconds,
                  collect: Callable[[list], list] = lambda items: items) -> Generated:
    """Generate the subset's first rows (see the module docstring). `summarize_rows(positions)`
    summarizes this process's share and returns (summaries, generated tokens); `agree` turns a
    local duration into the one all processes use (their maximum); `collect` gathers every
    process's (position, summary, tokens) triples."""
    total = len(spec.dialogues)
    limit = total if fixed_rows is None else min(int(fixed_rows), total)
    budget = spec.budget_seconds if fixed_rows is None and spec.budget_seconds else 0.0
    step = spec.batch_size * world if budget else max(1, limit)
    start, done, rounds, stopped, mine = time.perf_counter(), 0, 0, False, []
    while done < limit:
        positions = list(range(done, min(limit, done + step)))
        began = time.perf_counter()
        share = positions[rank::world]
        if share:
            texts, tokens = summarize_rows(share)
            per_row = _split_tokens(tokens, len(share))
            mine.extend(zip(share, texts, per_row))
        done, rounds = positions[-1] + 1, rounds + 1
        elapsed, last = agree(time.perf_counter() - start), agree(time.perf_counter() - began)
        if budget and done < limit and elapsed + last > budget:
            stopped = True
            break
    triples = sorted(collect(mine))
    return Generated([text for _, text, _ in triples], done, agree(time.perf_counter() - start),
                     sum(tokens for _, _, tokens in triples), stopped, rounds, [tokens for _, _, tokens in triples])


def _split_tokens(tokens, count: int) -> list[int]:
    if isinstance(tokens, (list, tuple)):
        return [int(t) for t in tokens]
    share = int(tokens) // max(1, count)
    return [share] * count


def unsupported_mention_rate(summaries: list[str], dialogues: list[str]) -> tuple[float | None, int]:
    """(share of the readable summaries with >= 1 unsupported mention, how many were readable)."""
    from finetuneflow.quality import faithfulness as F
    rows, _ = F.score_samples(summaries, dialogues, encoder="")
    flagged = [F.flags(row)["unsupported_mentions"] for row in rows]
    readable = [flag for flag in flagged if flag is not None]
    return (sum(readable) / len(readable) if readable else None), len(readable)


def rate_is_selectable(dialogues: list[str]) -> tuple[bool, str]:
    """Whether the unsupported-mention check may steer selection on these dialogues (median words)."""
    from finetuneflow.quality import faithfulness as F
    words = statistics.median([len(d.split()) for d in dialogues]) if dialogues else 0
    if UNSUPPORTED_COLUMN in F.selection_columns(words):
        return True, f"median dialogue {words:.0f} words (validated up to {F.VALIDATED_MAX_WORDS})"
    return False, (f"the evaluation dialogues' median length, {words:.0f} words, is over the "
                   f"{F.VALIDATED_MAX_WORDS} words the unsupported-mention check was validated on")


def score(spec: GenerationEval, generated: Generated, prefix: str = "eval") -> dict:
    """ROUGE and the unsupported-mention rate of the generated rows, plus what generating cost."""
    from finetuneflow.quality.metrics import mean_scores, rouge_per_sample
    rows = generated.rows
    start = time.perf_counter()
    rouge = mean_scores(rouge_per_sample(generated.summaries, spec.references[:rows]))
    rate, readable = unsupported_mention_rate(generated.summaries, spec.dialogues[:rows])
    scores = {f"{prefix}_{key}": round(value, 4) for key, value in rouge.items()}
    scores.update({f"{prefix}_{RATE_KEY}": None if rate is None else round(rate, 4),
                   f"{prefix}_faithfulness_readable": readable,
                   f"{prefix}_generation_seconds": round(generated.seconds, 2),
                   f"{prefix}_generated_rows": rows, f"{prefix}_generated_tokens": generated.generated_tokens,
                   f"{prefix}_scoring_seconds": round(time.perf_counter() - start, 2)})
    if rate is None:
        del scores[f"{prefix}_{RATE_KEY}"]    # trackers take numbers only; train_metrics.json shows None
    return scores
