"""Preference pairs for OBJECTIVE=dpo|orpo: chosen = the reference summary, rejected = a corruption of
it made by quality/corruptions.py, the code the faithfulness validation (benchmarks/
bench_faithfulness.py) uses, so the model is taught away from exactly the errors the shipped checks
measure: a name from another dialogue, a changed number or time, swapped speakers, a sentence from
another dialogue.

`make_pairs(rows, negatives, pairs_per_row, seed)` calls `corrupt(rows, seed)` as the benchmark
does (every kind for every row: a row's corruptions do not depend on NEGATIVES); for each row the
NEGATIVES kinds that apply are the candidates, and PAIRS_PER_ROW of them are drawn with
`random.Random(f"{seed}-pairs-{i}")` (0, or at least as many as apply: all), kept in NEGATIVES order.
A kind that cannot apply to a row (no number to change, one speaker only, ...) is skipped for that
row and counted; the counts go into the run record and train_metrics.json.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import datasets

from finetuneflow.quality.corruptions import KINDS, corrupt


@dataclass
class Pairs:
    """One entry per pair: the training row it comes from, the corruption kind and its text."""
    rows: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


def wanted_kinds(negatives: list[str]) -> list[str]:
    """NEGATIVES (name, number, speaker, sentence) as corruption names, in the order given, once each."""
    return [KINDS[kind] for kind in dict.fromkeys(negatives)]


def make_pairs(rows: list[dict], negatives: list[str], pairs_per_row: int, seed: int) -> Pairs:
    """The rejected summaries of `rows` (dicts with dialogue and summary) and their counts."""
    wanted = wanted_kinds(negatives)
    per_kind = {kind: {"pairs": 0, "skipped": 0} for kind in wanted}
    pairs, without = Pairs(), 0
    for i, options in enumerate(corrupt(rows, seed)):
        applicable = [kind for kind in wanted if options[kind]]
        for kind in wanted:
            if not options[kind]:
                per_kind[kind]["skipped"] += 1
        if not applicable:
            without += 1
            continue
        if pairs_per_row and pairs_per_row < len(applicable):
            drawn = set(random.Random(f"{seed}-pairs-{i}").sample(applicable, pairs_per_row))
            applicable = [kind for kind in applicable if kind in drawn]
        for kind in applicable:
            pairs.rows.append(i)
            pairs.kinds.append(kind)
            pairs.rejected.append(options[kind])
            per_kind[kind]["pairs"] += 1
    pairs.counts = {"pairs": len(pairs.rows), "rows": len(rows), "rows_without_pair": without,
                    "pairs_per_row": pairs_per_row, "seed": seed, "kinds": per_kind}
    return pairs


def pair_rows(split: datasets.Dataset, negatives: list[str], pairs_per_row: int,
              seed: int) -> tuple[datasets.Dataset, dict]:
    """A split's pairs as rows (id, dialogue, summary = chosen, rejected, kind) and their counts."""
    rows = [{"dialogue": d, "summary": s} for d, s in zip(split["dialogue"], split["summary"])]
    pairs = make_pairs(rows, negatives, pairs_per_row, seed)
    ids = list(split["id"])
    table = {"id": [ids[i] for i in pairs.rows], "dialogue": [rows[i]["dialogue"] for i in pairs.rows],
             "summary": [rows[i]["summary"] for i in pairs.rows], "rejected": pairs.rejected, "kind": pairs.kinds}
    return datasets.Dataset.from_dict(table), pairs.counts
