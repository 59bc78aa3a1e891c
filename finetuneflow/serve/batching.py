"""The server's model worker: micro-batching, fair turns between clients, cancellation.

One thread (the model thread) is the only one that ever runs the model or its tokenizer while a
request is served. It takes turns from per-client queues in round robin, so one client with a
heavy request cannot starve the others:

* a *short* dialogue (one that fits the model input) is an item; when an item's turn comes, the
  thread waits up to `wait_ms` for company and then runs up to `batch_size` items with the same
  decoding settings as one engine batch, taking them round robin across clients (micro-batching);
* a *long* dialogue (summarized in windows, engine/long_input.py) runs in a job thread of its own
  that may only work while the model thread hands it the turn: every engine batch of its
  map-reduce (a `Control.run`) goes back into its client's queue and waits for its next turn, so
  other clients' batches run in between and a 100-window request delays them by one batch.

A request is cancelled (its queued items dropped, its long job stopped before its next batch) when
its client disconnects, its wall-clock budget runs out, its token budget is spent, or the server
shuts down. A running engine batch is never interrupted: it is bounded by the request limits.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.engine.long_input import Cancelled, Control, Part
from finetuneflow.serve.streams import BatchSink, Delta, PartsSink

log = logging.getLogger("finetuneflow.serve")


class Rejected(Exception):
    """A request the server refuses or stops: HTTP status, a stable code, a one-line message."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass(frozen=True)
class Decoding:
    """Everything that must be equal for dialogues to share an engine batch."""
    settings: GenerationSettings
    sampling: tuple = ()            # (("temperature", t), ("top_p", p), ("seed", s)); () = the evaluated settings
    prompt: str = "summary"         # "summary" (the trained prompt) | "raw_chat" | "raw_text"

    def sampling_dict(self) -> dict | None:
        return dict(self.sampling) or None


@dataclass
class Result:
    """One dialogue's outcome."""
    summary: str
    truncated: bool
    windows: int
    finish_reason: str
    input_tokens: int
    generated: int
    settings: dict
    checks: dict | None = None      # the faithfulness checks' findings (ftf.checks), added by the service


class Job:
    """One request's work: its dialogues, the event stream, the futures, and how to stop it."""

    _ids = itertools.count(1)

    def __init__(self, client: str, dialogues: list[str], long: list[bool], decoding: Decoding,
                 loop: asyncio.AbstractEventLoop, *, cost: int = 0, budget: int | None = None,
                 deadline: float | None = None, events: asyncio.Queue | None = None):
        self.id = next(self._ids)
        self.client, self.dialogues, self.long, self.decoding = client, dialogues, long, decoding
        self.loop, self.cost, self.budget, self.deadline, self.events = loop, cost, budget, deadline, events
        self.futures = [loop.create_future() for _ in dialogues]
        self.reason: str | None = None      # why it was stopped: client_left | deadline | budget | shutdown
        self.on_cancel: Callable[[str], None] | None = None
        self.spent = 0                      # work tokens used so far (inputs + beams x new tokens)
        self.parts: dict[int, list[Part]] = {}
        self.started = time.monotonic()
        self.sent: dict[int, str] = {}      # dialogue -> the text streamed so far (model thread)

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            if self.on_cancel is not None and not all(f.done() for f in self.futures):
                self.on_cancel(reason)

    def stop_reason(self) -> str | None:
        if self.reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.cancel("deadline")
        return self.reason

    # -- called from the model or job threads -------------------------------------------------
    def deliver(self, index: int, value: Any = None, error: BaseException | None = None) -> None:
        def settle():
            future = self.futures[index]
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(value)
        self._call(settle)

    def emit(self, part: Part) -> None:
        self.parts.setdefault(part.dialogue, []).append(part)
        if self.events is not None:
            self._call(self.events.put_nowait, part)

    def stream(self, delta: Delta) -> None:
        """The next piece of a summary, for a streaming request (model thread)."""
        if self.events is not None:
            self._call(self.events.put_nowait, delta)

    def _call(self, function, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(function, *args)
        except RuntimeError:        # the event loop is gone (the server stopped): nobody waits any more
            pass

    async def results(self) -> list[Result]:
        return list(await asyncio.gather(*self.futures))


@dataclass
class _Item:
    job: Job
    index: int
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class _Step:
    """A long job's turn: the model thread sets `go`, the job thread sets `done` when it yields."""
    job: Job
    go: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    """Fair micro-batching over one model. `short(loaded_for, texts, decoding)` runs one engine
    batch of fitting dialogues and returns a GenerationResult; `long(job, texts, control)` runs a
    long-input map-reduce (LongGenerationResult) with the given Control."""

    def __init__(self, short: Callable, long: Callable, batch_size: int = 8, wait_ms: float = 5.0,
                 enabled: bool = True, max_pending: int = 1024, client_pending_tokens: int | None = None,
                 on_batch: Callable[[int, float, int], None] | None = None):
        self.short_run, self.long_run = short, long
        self.batch_size, self.wait_ms, self.enabled = batch_size, wait_ms, enabled
        self.max_pending, self.client_pending_tokens = max_pending, client_pending_tokens
        self.on_batch = on_batch
        self.stats = {"batches": 0, "dialogues": 0, "largest_batch": 0, "long_jobs": 0, "cancelled": 0}
        self._cv = threading.Condition()
        self._queues: dict[str, deque] = {}
        self._ring: deque[str] = deque()           # clients with queued turns, in round-robin order
        self._pending_cost: dict[str, int] = {}    # client -> estimated work tokens admitted, not finished
        self._active: set[Job] = set()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> bool:
        """Refuse new work, cancel what is queued or running (a running batch finishes), wait up
        to `timeout` seconds for the model thread; True when it ended."""
        with self._cv:
            self._closing = True
            for job in list(self._active):
                job.cancel("shutdown")
            self._cv.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queued(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._queues.values())

    @property
    def active_jobs(self) -> int:
        return len(self._active)

    # -- admission (event loop) ---------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue `job`: its short dialogues as items, its long ones as one job thread. Raises
        Rejected (503 shutting down / overloaded, 429 this client has too much queued)."""
        with self._cv:
            if self._closing:
                raise Rejected(503, "shutting_down", "the server is shutting down; retry on another instance")
            queued = sum(len(q) for q in self._queues.values())
            if queued + len(job.dialogues) > self.max_pending:
                raise Rejected(503, "overloaded", f"{queued} dialogues are waiting (MAX_PENDING={self.max_pending}); "
                                                  f"retry shortly")
            held = self._pending_cost.get(job.client, 0)
            if self.client_pending_tokens is not None and held and held + job.cost > self.client_pending_tokens:
                raise Rejected(429, "client_busy", f"this client already has about {held} work tokens queued or "
                                                   f"running (CLIENT_PENDING_TOKENS={self.client_pending_tokens}); "
                                                   f"wait for its answers before sending more")
            self._pending_cost[job.client] = held + job.cost
            self._active.add(job)
            for index, is_long in enumerate(job.long):
                if not is_long:
                    self._enqueue(job.client, _Item(job, index))
            self._cv.notify_all()
        if any(job.long):
            self.stats["long_jobs"] += 1
            threading.Thread(target=self._long_job, args=(job,), name=f"long-{job.id}", daemon=True).start()
        return job

    def finished(self, job: Job) -> None:
        """The request is over (answered, failed or cancelled): release its admission."""
        with self._cv:
            if job in self._active:
                self._active.discard(job)
                self._pending_cost[job.client] = max(0, self._pending_cost.get(job.client, 0) - job.cost)
                if not self._pending_cost[job.client]:
                    del self._pending_cost[job.client]

    # -- queues (callers hold self._cv) ---------------------------------------------------------
    def _enqueue(self, client: str, turn) -> None:
        queue = self._queues.setdefault(client, deque())
        if not queue and client not in self._ring:
            self._ring.append(client)
        queue.append(turn)

    def _next_turn(self):
        """The head of the next client's queue in round robin; cancelled items are dropped."""
        while self._ring:
            client = self._ring.popleft()
            queue = self._queues[client]
            turn = queue.popleft()
            if queue:
                self._ring.append(client)
            else:
                del self._queues[client]
            if isinstance(turn, _Item) and turn.job.stop_reason():
                self._drop(turn)
                continue
            return turn
        return None

    def _drop(self, item: _Item) -> None:
        self.stats["cancelled"] += 1
        item.job.deliver(item.index, error=Cancelled(item.job.reason))

    def _compatible(self, first: _Item, room: int) -> list[_Item]:
        """Up to `room` more queued items that may share `first`'s batch, round robin across
        clients (each client's oldest first)."""
        taken: list[_Item] = []
        alone = not self.enabled or bool(first.job.decoding.sampling)   # sampled requests run alone: a seed repeats

        def wanted(item: _Item) -> bool:
            return item.job is first.job if alone else item.job.decoding == first.job.decoding
        progress = True
        while len(taken) < room and progress:
            progress = False
            for client in list(self._ring):
                queue = self._queues.get(client)
                match = next((t for t in queue if isinstance(t, _Item) and wanted(t)), None) if queue else None
                if match is None:
                    continue
                queue.remove(match)
                if not queue:
                    del self._queues[client]
                    self._ring.remove(client)
                if match.job.stop_reason():
                    self._drop(match)
                else:
                    taken.append(match)
                progress = True
                if len(taken) >= room:
                    break
        return taken

    def _count_compatible(self, first: _Item) -> int:
        return sum(1 for q in self._queues.values() for t in q
                   if isinstance(t, _Item) and t.job.decoding == first.job.decoding)

    # -- the model thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                turn = self._next_turn()
                while turn is None:
                    if self._closing and not self._active:
                        return
                    self._cv.wait(0.5 if self._closing else None)
                    turn = self._next_turn()
                batch = self._gather(turn) if isinstance(turn, _Item) else None
            try:
                if batch is not None:
                    self._run_batch(batch)
                else:
                    turn.go.set()          # the long job works until it yields its turn back
                    turn.done.wait()
            except Exception:  # noqa: BLE001  a bug must not stop the model thread: log it, serve the next turn
                log.exception("the model thread failed on a turn")
                for item in batch or []:
                    item.job.deliver(item.index, error=RuntimeError("the server failed on this request"))

    def _gather(self, first: _Item) -> list[_Item]:
        """`first` plus company (caller holds self._cv): wait up to wait_ms after `first` arrived
        for more compatible items unless a full batch is already there."""
        if self.enabled and self.wait_ms > 0 and not first.job.decoding.sampling:
            deadline = first.arrived + self.wait_ms / 1000
            while self._count_compatible(first) + 1 < self.batch_size and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
        return [first] + self._compatible(first, self.batch_size - 1)

    def _run_batch(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        sink = BatchSink([(i.job, i.index) for i in batch])
        try:
            result = self.short_run([i.job.dialogues[i.index] for i in batch], batch[0].job.decoding, sink)
        except Exception as exc:  # noqa: BLE001  (handed to the waiting requests)
            jobs = list(dict.fromkeys(i.job for i in batch))
            if len(jobs) > 1:                    # one bad request fails alone
                for job in jobs:
                    self._run_batch([i for i in batch if i.job is job])
                return
            for item in batch:
                item.job.deliver(item.index, error=exc)
            return
        seconds = time.perf_counter() - start
        self.stats["batches"] += 1
        self.stats["dialogues"] += len(batch)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        if self.on_batch:
            self.on_batch(len(batch), seconds, result.generated_tokens)
        for k, item in enumerate(batch):
            if item.job.cancelled:           # its row was stopped part-way: not a summary
                self._drop(item)
                continue
            value = Result(result.summaries[k], result.truncated[k], 1, result.finish_reasons[k],
                           result.input_tokens[k], result.generated[k], result.settings)
            item.job.emit(Part(item.index, 0, 1, 1, value.summary, True, value.input_tokens, value.generated,
                               value.finish_reason))
            item.job.deliver(item.index, value)

    # -- long jobs (their own threads, working only on their turn) ------------------------------
    def _long_job(self, job: Job) -> None:
        indices = [i for i, is_long in enumerate(job.long) if is_long]
        control = _TurnControl(self, job)
        try:
            control.first_turn()
            result = self.long_run(job, [job.dialogues[i] for i in indices], control)
        except BaseException as exc:  # noqa: BLE001  Cancelled, a UserError, a bug: handed to the request
            for i in indices:
                job.deliver(i, error=exc)
        else:
            for k, i in enumerate(indices):
                parts = job.parts.get(i, [])
                value = Result(result.summaries[k], result.truncated[k], result.windows[k],
                               parts[-1].finish_reason if parts else "stop",
                               sum(p.input_tokens for p in parts), sum(p.generated for p in parts), result.settings)
                job.deliver(i, value)
        finally:
            control.release()


class _TurnControl(Control):
    """long_input's Control for a long job: every engine batch waits for the job's turn."""

    def __init__(self, scheduler: Scheduler, job: Job):
        self.scheduler, self.job = scheduler, job
        self.turn: _Step | None = None
        self.indices = [i for i, is_long in enumerate(job.long) if is_long]

    def first_turn(self) -> None:
        self._wait_turn()
        self.check()

    def _wait_turn(self) -> None:
        step = _Step(self.job)
        with self.scheduler._cv:
            self.scheduler._enqueue(self.job.client, step)
            self.scheduler._cv.notify_all()
        self.release()
        step.go.wait()
        self.turn = step

    def release(self) -> None:
        if self.turn is not None:
            self.turn.done.set()
            self.turn = None

    def check(self) -> None:
        reason = self.job.stop_reason()
        if reason is None and self.job.budget is not None and self.job.spent > self.job.budget:
            self.job.cancel(reason := "budget")
        if reason is not None:
            raise Cancelled(reason)

    def run(self, call):
        self._wait_turn()          # other clients' batches run in between
        self.check()
        start = time.perf_counter()
        result = call()
        beams = int(result.settings.get("num_beams") or 1)
        self.job.spent += sum(result.input_tokens) + beams * sum(result.generated)
        if self.scheduler.on_batch:
            self.scheduler.on_batch(len(result.summaries), time.perf_counter() - start, result.generated_tokens)
        self.scheduler.stats["batches"] += 1
        return result

    def sink(self, parts: list[Part]) -> PartsSink:
        return PartsSink(self.job, parts, [self.indices[p.dialogue] for p in parts])

    def part(self, part: Part) -> None:
        # long_input numbers the dialogues it was given; the request numbers all of its dialogues
        self.job.emit(Part(**{**part.__dict__, "dialogue": self.indices[part.dialogue]}))
