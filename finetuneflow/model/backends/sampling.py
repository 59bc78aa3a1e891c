"""Seeded sampling of candidate rows, the same on every backend that samples MBR's candidates.

Each candidate row has its own generator (seeded from its row's seed and its place among the
row's samples, contract/decoding.py `candidate_seed`), so a candidate's tokens depend only on its
own seed and logits, never on the other rows of its batch. A step warps the logits the way
transformers' sampling does (temperature, then top-p: `TemperatureLogitsWarper`,
`TopPLogitsWarper`) and draws each row's token by inverse transform from one uniform number of
that row's generator (float64 cumulative probabilities on the CPU, so the draw does not depend on
the device's reduction order).
"""
from __future__ import annotations

import torch

from finetuneflow.contract.decoding import candidate_seed


class CandidateDraws:
    """One generator per candidate row: rows r*N .. r*N+N-1 are row r's samples 1..N."""

    def __init__(self, row_seeds: list[int], samples: int, temperature: float, top_p: float):
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper
        self.generators = [torch.Generator().manual_seed(candidate_seed(seed, j + 1))
                           for seed in row_seeds for j in range(samples)]
        self.warpers = []
        if float(temperature) != 1.0:
            self.warpers.append(TemperatureLogitsWarper(float(temperature)))
        if float(top_p) < 1.0:
            self.warpers.append(TopPLogitsWarper(float(top_p)))

    def draw(self, scores: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """The sampled token of each row of `scores` ([rows, vocab] logits, already masked for
        banned tokens); `rows`: which candidate rows they are (default: all, in order)."""
        rows = list(range(len(self.generators))) if rows is None else rows
        warped = scores.float()
        for warper in self.warpers:
            warped = warper(None, warped)
        probs = torch.softmax(warped, dim=-1).double().cpu()
        cumulative = probs.cumsum(-1)
        uniforms = torch.stack([torch.rand((), generator=self.generators[r], dtype=torch.float64) for r in rows])
        picked = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1])[:, None]).squeeze(-1)
        picked = picked.clamp_(max=probs.shape[-1] - 1)
        # a token of probability 0 is never drawn (searchsorted can land on one only at a float tie)
        zero = probs.gather(-1, picked[:, None]).squeeze(-1) <= 0
        if zero.any():
            picked[zero] = probs[zero].argmax(-1)
        return picked.to(scores.device)
