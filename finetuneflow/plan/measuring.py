"""Measuring one model: speed, peak memory and size, through the shared generation engine.

`measure_model(MeasureRequest)` loads the model, warms up on the shortest dialogues (untimed),
then times one generate pass over all dialogues; samples/s and generated tokens/s come from that
pass only. Peak memory is torch.cuda.max_memory_allocated on a GPU and the peak RSS of the
process on a CPU. `run_isolated` runs it in a fresh process so those numbers are the model's own
(imports included on CPU) and a crash or an out-of-memory kill becomes an error row.

The input length is the smaller of MAX_INPUT_LENGTH and what the model can take (a causal model
keeps room for the new tokens), so a long dialogue is cut instead of overflowing the positions.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.plan.model_facts import architecture_columns, linear_layers


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __init__(self, interval: float = 0.02):
        import psutil
        self._process, self._interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


@dataclass(frozen=True)
class MeasureRequest:
    """One model to measure (picklable: it crosses into the isolated process)."""
    source: str                        # what load_model gets: a folder or a Hub id
    dialogues: tuple[str, ...]
    generation: GenerationSettings
    batch_size: int = 8
    max_input_length: int | None = None   # None: the model's limit
    instruction: str | None = None
    warmup: int = 2                    # untimed generations on the shortest dialogues first
    load_in_4bit: bool = False
    trust_remote_code: bool = False


def input_limit(loaded, request: MeasureRequest) -> int:
    """MAX_INPUT_LENGTH, but never more than the model can take with its new tokens."""
    from finetuneflow.engine.generation import default_input_limit, effective_settings
    limit = default_input_limit(loaded, effective_settings(loaded, request.generation))
    return min(request.max_input_length, limit) if request.max_input_length else limit


def model_size(loaded) -> dict:
    """Parameters, quantisable parameters and dtype of a transformers model (None for other runtimes)."""
    import torch
    if not isinstance(loaded.model, torch.nn.Module):
        return {"parameters": None, "quantizable_parameters": None, "dtype": loaded.dtype}
    from finetuneflow.model.backends.hf import parameter_count
    return {"parameters": parameter_count(loaded.model)[1], "quantizable_parameters": linear_layers(loaded.model)[0],
            "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", "")}


def _generate(request: MeasureRequest) -> dict:
    """Load, warm up and time one pass; returns the result and the loaded model's facts."""
    from finetuneflow.engine.generation import summarize
    from finetuneflow.model.loading import load_model
    start = time.perf_counter()
    loaded = load_model(request.source, load_in_4bit=request.load_in_4bit,
                        trust_remote_code=request.trust_remote_code)
    load_seconds = time.perf_counter() - start
    limit = input_limit(loaded, request)
    dialogues = list(request.dialogues)
    if request.warmup:
        summarize(loaded, sorted(dialogues, key=len)[:request.warmup], request.generation, request.batch_size,
                  limit, request.instruction, progress=False)
    result = summarize(loaded, dialogues, request.generation, request.batch_size, limit, request.instruction)
    return {"summaries": result.summaries, "seconds": result.seconds, "generated_tokens": result.generated_tokens,
            "truncated_inputs": sum(result.truncated), "max_input_length": limit, "settings": result.settings,
            "load_seconds": load_seconds, **model_size(loaded), **architecture_columns(loaded.config),
            "family": str(loaded.family), "backend": loaded.backend.name}


def measure_model(request: MeasureRequest, isolated: bool = False) -> dict:
    """Speed, peak memory (GPU: max allocated; CPU: peak RSS), size and the summaries of one model."""
    import resource
    import torch
    if isolated:   # the parent's run_cli quieted these bars; a fresh process must do it again
        import transformers
        transformers.utils.logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        measured = _generate(request)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "GPU max allocated"
    else:   # in a child of its own, ru_maxrss (KB) is this model's; in-process only the sampled peak is
        peak = max(rss.peak / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if isolated else 0)
        kind = "process peak RSS"
    return {**measured, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "peak_memory_mb": round(peak, 1), "memory_kind": kind}


def run_isolated(request: MeasureRequest) -> dict:
    """measure_model in a fresh process: its peak memory is this model's alone, and a crash or an
    out-of-memory kill becomes an error row instead of ending the benchmark."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure_model, request, isolated=True).result()
        except BrokenProcessPool:
            raise RuntimeError("the model's process died (killed for memory?)") from None
