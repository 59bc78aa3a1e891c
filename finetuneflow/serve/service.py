"""The summarization service behind every HTTP route (/summarize and the OpenAI-compatible ones):
check a request against the limits, admit it with its budget, and wait for (or stream) its
results while watching for a client that hangs up or a deadline that passes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from finetuneflow.contract.data import check_unicode
from finetuneflow.contract.decoding import GenerationSettings, override
from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.engine.long_input import Cancelled
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.serve.batching import Decoding, Job, Rejected, Result, Scheduler
from finetuneflow.serve.checking import Checker
from finetuneflow.serve.inference_io import model_info
from finetuneflow.serve.metrics import Metrics
from finetuneflow.serve.options import ServerOptions
from finetuneflow.serve.streams import Delta
from finetuneflow.serve.work import Plan, Runner

log = logging.getLogger("finetuneflow.serve")
Disconnected = Callable[[], Awaitable[bool]]
POLL_S = 0.2          # how often a waiting request checks whether its client is still there


MBR_STREAMING = ("decoding \"mbr\" is not token-streamed: it picks a summary once every candidate is done, so "
                 "a stream sends it as one delta")


class ClientLeft(Exception):
    """The client disconnected; its work was cancelled and nobody is waiting for an answer."""


STOPPED = {"deadline": (504, "deadline_exceeded", "the request ran past its wall-clock budget of {timeout:g} s "
                        "(REQUEST_TIMEOUT_S); send shorter dialogues or fewer per request"),
           "budget": (503, "token_budget_spent", "the request used up its budget of {budget:,} work tokens "
                      "(REQUEST_TOKEN_BUDGET) before it finished; send shorter dialogues"),
           "shutdown": (503, "shutting_down", "the server is shutting down; retry on another instance")}


class Service:
    def __init__(self, loaded: LoadedModel, options: ServerOptions):
        self.loaded, self.options = loaded, options
        self.runner = Runner(loaded, options)
        self.metrics = Metrics(lambda: self.scheduler.queued, lambda: self.scheduler.active_jobs)
        self.scheduler = Scheduler(self.runner.short, self.runner.long, options.batch_size, options.batch_wait_ms,
                                   options.micro_batching, options.max_pending, options.client_pending_tokens,
                                   on_batch=self.metrics.batch)
        self.checker = Checker(options.checks, options.checks_encoder, self.metrics)
        self.defaults: GenerationSettings = options.defaults
        self.info = model_info(loaded)
        self.model_id = options.model_id or Path(self.info["model"] or loaded.name).name or "model"
        self.started = time.time()

    # -- decoding and admission ---------------------------------------------------------------
    def decoding(self, overrides: dict, sampling: dict | None = None, prompt: str = "summary") -> Decoding:
        """The request's decoding settings within the limits; Rejected (422) otherwise."""
        options = self.options
        new = overrides.get("max_new_tokens")
        if new is not None and new > options.max_new_tokens_limit:
            raise Rejected(422, "max_new_tokens_too_large", f"max_new_tokens {new} is over the limit "
                                                            f"{options.max_new_tokens_limit} (MAX_NEW_TOKENS_LIMIT)")
        if overrides.get("num_beams", 1) > options.max_beams:
            raise Rejected(422, "num_beams_too_large", f"num_beams {overrides['num_beams']} is over {options.max_beams}"
                                                       f" (MAX_BEAMS)")
        if overrides.get("min_new_tokens", 0) > (new or options.max_new_tokens_limit):
            raise Rejected(422, "min_over_max", "min_new_tokens is larger than max_new_tokens")
        settings = self.request_settings(overrides, sampling)
        if sampling and not self.runner.sampling_available():
            raise Rejected(422, "sampling_unavailable", f"temperature > 0 needs sampling, which the "
                                                        f"{self.loaded.backend.name} backend does not do here; "
                                                        f"use temperature 0 (the evaluated settings)")
        return Decoding(settings, tuple(sorted((sampling or {}).items())), prompt)

    def request_settings(self, overrides: dict, sampling: dict | None) -> GenerationSettings:
        """The request's decoding over the defaults (DECODING and num_beams as one choice); 422 for
        what contradicts itself, what this server does not allow, or what its backend cannot run."""
        asked = overrides.get("decoding")
        if asked == "mbr" and not self.options.mbr_allowed():
            raise Rejected(422, "mbr_not_allowed", "decoding \"mbr\" is not enabled on this server (it costs "
                                                   "MBR_SAMPLES + 1 generations per dialogue); start it with "
                                                   "--MBR_REQUESTS=True, or ask for greedy or beam", "decoding")
        if sampling and asked == "mbr":
            raise Rejected(422, "mbr_with_sampling", "temperature > 0 samples one summary; decoding \"mbr\" picks "
                                                     "among its own samples: ask for one of them", "decoding")
        if sampling and not asked:
            overrides = {**overrides, "decoding": None}     # sampling replaces a default of MBR
        try:
            settings = override(self.defaults, overrides, self.options.mbr_knobs())
            if sampling and settings.decoding == "mbr":
                settings = override(settings, {"decoding": "greedy"})
            self.loaded.backend.refuse_unsupported(settings)
        except UserError as exc:
            raise Rejected(422, "invalid_decoding" if "min_new" not in str(exc).lower() else "min_over_max",
                           str(exc)) from None
        return settings

    def check_dialogues(self, dialogues: list[str], what: str = "dialogue") -> None:
        options = self.options
        if not dialogues or len(dialogues) > options.max_dialogues:
            raise Rejected(422, "too_many_dialogues" if dialogues else "no_dialogues",
                           f"{len(dialogues)} {what}s; send 1 to {options.max_dialogues} per request (MAX_DIALOGUES)")
        for i, text in enumerate(dialogues):
            if not text.strip():
                raise Rejected(422, "empty_dialogue", f"{what} {i} is empty")
            if len(text) > options.max_chars:
                raise Rejected(422, "dialogue_too_long", f"{what} {i} has {len(text)} characters; the limit is "
                                                         f"{options.max_chars} (MAX_CHARS)")
            try:
                check_unicode(text, f"{what} {i}")
            except UserError as exc:
                raise Rejected(422, "invalid_text", str(exc)) from None

    async def admit(self, dialogues: list[str], decoding: Decoding, client: str, stream: bool = False,
                    what: str = "dialogue") -> tuple[Job, Plan]:
        """Check, cost and queue a request; Rejected (4xx/503) when it cannot be served."""
        self.check_dialogues(dialogues, what)
        try:
            plan = await asyncio.to_thread(self.runner.plan, dialogues, decoding)
        except UserError as exc:
            raise Rejected(422, "unprocessable", str(exc)) from None
        loop = asyncio.get_running_loop()
        job = Job(client, dialogues, plan.long, decoding, loop, cost=plan.cost,
                  budget=self.options.request_token_budget,
                  deadline=time.monotonic() + self.options.request_timeout_s,
                  events=asyncio.Queue() if stream else None)
        job.on_cancel = lambda reason: self.metrics.cancelled.labels(reason).inc()
        self.scheduler.submit(job)
        if self.checker.enabled and decoding.prompt == "summary":
            loop.run_in_executor(None, self.checker.prepare, dialogues)    # a head start for the checks
        return job, plan

    # -- answers ------------------------------------------------------------------------------
    def failure(self, job: Job, error: BaseException) -> Exception:
        """What a failed dialogue means for the client."""
        if isinstance(error, Cancelled):
            reason = job.reason or str(error) or "client_left"
            if reason not in STOPPED:
                return ClientLeft()
            status, code, message = STOPPED[reason]
            return Rejected(status, code, message.format(timeout=self.options.request_timeout_s,
                                                         budget=self.options.request_token_budget))
        if isinstance(error, Rejected):
            return error
        if isinstance(error, UserError):
            return Rejected(422, "unprocessable", str(error))
        log.error("generation failed", exc_info=error)
        return Rejected(500, "internal_error", f"{type(error).__name__}: {first_line(error)}")

    async def _watch(self, job: Job, disconnected: Disconnected) -> None:
        """Raise (after cancelling the job) when the client left or the deadline passed."""
        if await disconnected():
            job.cancel("client_left")
        elif job.stop_reason() != "deadline":
            return
        raise self.failure(job, Cancelled(job.reason))

    async def results(self, job: Job, disconnected: Disconnected) -> list[Result]:
        """Every dialogue's Result, in order; Rejected / ClientLeft when the request failed."""
        gathered = asyncio.ensure_future(asyncio.gather(*job.futures))
        try:
            while True:
                try:
                    results = list(await asyncio.wait_for(asyncio.shield(gathered), POLL_S))
                    await self.checker.add(results, job.dialogues)
                    return results
                except asyncio.TimeoutError:
                    pass
                except Exception as exc:  # noqa: BLE001  a dialogue failed
                    raise self.failure(job, exc) from None
                await self._watch(job, disconnected)
        finally:
            self.finish(job)
            gathered.cancel()

    async def events(self, job: Job, disconnected: Disconnected) -> AsyncIterator[tuple[str, object]]:
        """("part", Part) for every finished window, ("part_delta", Delta) for every piece of a
        window's summary as its tokens come, ("delta", Delta) for every piece of a summary, then
        ("result", (index, Result)) for each dialogue as it completes; raises Rejected / ClientLeft like `results`."""
        pending, last = dict(enumerate(job.futures)), {}
        try:
            while pending:
                try:
                    first = await asyncio.wait_for(job.events.get(), POLL_S)
                except asyncio.TimeoutError:
                    first = None
                parts = [first] if first is not None else []
                while not job.events.empty():
                    parts.append(job.events.get_nowait())
                for part in parts:
                    if isinstance(part, Delta) and part.part is not None:
                        yield "part_delta", part
                    elif isinstance(part, Delta):
                        self.metrics.token_time(part.at - last.get(part.dialogue, job.started),
                                                first=part.dialogue not in last)
                        last[part.dialogue] = part.at
                        yield "delta", part
                    elif not part.final:
                        yield "part", part
                for index, future in sorted(pending.items()):
                    if future.done():
                        del pending[index]
                        if future.exception() is not None:
                            raise self.failure(job, future.exception())
                        await self.checker.add([future.result()], [job.dialogues[index]])
                        yield "result", (index, future.result())
                if first is None and pending:
                    await self._watch(job, disconnected)
        finally:
            self.finish(job)

    def finish(self, job: Job) -> None:
        """The request is over: anything of it still queued or running is abandoned."""
        if job.reason is None and not all(f.done() for f in job.futures):
            job.cancel("client_left" if job.events is not None else "abandoned")
        self.scheduler.finished(job)

    # -- facts for /info and /v1/models ---------------------------------------------------------
    def describe(self) -> dict:
        options = self.options
        decoding = Decoding(self.defaults)
        return {**self.info, "id": self.model_id, "defaults": self.defaults.as_dict(),
                "effective_defaults": {k: v for k, v in self.runner_effective(decoding).items() if k != "backend"},
                "instruction": options.instruction, "prompt": self.prompt_description(),
                "max_input_length": self.runner.limit(decoding), "long_input": options.long_input,
                "sampling": self.runner.sampling_available(), "limits": options.limits(),
                "mbr": {"requests_allowed": options.mbr_allowed(), "knobs": options.mbr_knobs(),
                        "streaming": MBR_STREAMING}, "checks": self.checker.describe()}

    def runner_effective(self, decoding: Decoding) -> dict:
        """The request's deterministic decoding settings as responses show them."""
        from finetuneflow.engine.generation import effective_settings
        return effective_settings(self.loaded, decoding.settings).as_record()

    def prompt_description(self) -> str:
        if self.loaded.family == "causal":
            return ("the dialogue (a chat request's last user message) is wrapped in the instruction above inside "
                    "the tokenizer's chat template, as in training and evaluation; raw_prompt=true sends the text "
                    "alone")
        return ("the dialogue (a chat request's last user message) is the encoder input, with the model's task "
                "prefix when it has one, as in training and evaluation; raw_prompt=true drops the prefix")
