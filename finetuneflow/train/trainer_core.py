"""What every trainer of the training stage adds to transformers' Trainer (and to TRL's
preference trainers, train/preference.py): one mixin, `SummaryTrainerMixin`, put before the
Trainer class it extends.

* Every evaluation adds ROUGE and the unsupported-mention rate of summaries generated for a fixed,
  length-stratified subset of the validation rows, on a time budget (train/evaluation.py; shared
  across processes), to the validation loss, and reports what each part cost. The best
  checkpoint follows SELECT_ON (train/selection.py), decided again after every evaluation.
* In-training generation runs without the backend's exact speed-ups: its prompt-prefix KV cache is
  kept per model object, whose weights change between evaluations here (a cache kept from the
  first evaluation made every later one decode from stale keys and values).
* In-training generation runs in fp32 (autocast off), as the evaluation stage generates, so the
  checkpoint chosen is the one the evaluation stage would choose; EVAL_PRECISION=autocast
  generates under the training autocast instead (faster on a GPU; bf16 summaries on SmolLM2 scored
  ROUGE-L 30.95 where the same adapter in fp32 scored 32.92).
* Resume equivalence: transformers' group_by_length sampler draws each epoch's order from the
  global RNG, whose state a resumed process cannot know at the start of the epoch (the RNG state
  saved in a checkpoint is restored only after the order is drawn), so a run killed and resumed
  saw other batches than an uninterrupted one. `EpochSeededLengthSampler` draws epoch e's order
  from its own generator seeded with (SEED, e): the Trainer's batch skipping and its RNG state
  files then make a resumed run train on exactly the same batches with the same dropout.
* A NaN/inf loss (or, without a gradient scaler, gradient) stops training before the optimizer
  applies it: `NonFiniteTraining`, a UserError that names the step and the fix.
* Throughput: samples and real (non-padding) tokens of the training steps (`batch_counts`, which a
  trainer whose batches look different overrides).
"""
from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler

from finetuneflow.contract.errors import UserError
from finetuneflow.engine.generation import summarize
from finetuneflow.model.backends.hf import BACKEND as HF
from finetuneflow.model.backends.hf import exact_speedups, unwrap
from finetuneflow.model.family import family_of
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.train import evaluation, selection
from finetuneflow.train.evaluation import GenerationEval
from finetuneflow.train.run_dir import checkpoint_step, complete_checkpoints, drop_checkpoint, mark_complete

__all__ = ["CheckpointCallback", "EpochSeededLengthSampler", "NonFiniteTraining", "SummaryTrainerMixin",
           "close_progress_bars", "nonfinite_problem", "peak_rss_mb"]


class NonFiniteTraining(UserError):
    """The loss or the gradients became NaN/inf: the run stops before the weights are spoiled."""


class EpochSeededLengthSampler(LengthGroupedSampler):
    """group_by_length's order, drawn for epoch e from a generator seeded with (seed, e) alone."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        self.generator.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63 - 1))
        return super().__iter__()


def nonfinite_problem(bad_loss: torch.Tensor, grads: list[torch.Tensor]) -> str | None:
    """'loss' / 'gradient' when the accumulated loss flag or any gradient is not finite (one sync)."""
    bad_grad = torch.stack([~torch.isfinite(g).all() for g in grads]).any() if grads else torch.tensor(False)
    flags = torch.stack([bad_loss.to(torch.bool).cpu(), bad_grad.cpu()]).tolist()
    return "loss" if flags[0] else "gradient" if flags[1] else None


def close_progress_bars(trainer: Trainer) -> None:
    """Close the Trainer's progress bars, so a message printed next starts on a line of its own."""
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None:
                bar.close()
                setattr(callback, name, None)


class _FiniteGuard(TrainerCallback):
    """Before each optimizer step: the loss of its micro-batches and (unless a gradient scaler
    skips overflowing fp16 steps itself) the trainable parameters' gradients must be finite."""

    def __init__(self, trainer: "SummaryTrainerMixin"):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        scaler = getattr(trainer.accelerator, "scaler", None)
        grads = [] if scaler is not None else [p.grad for p in trainer.model.parameters()
                                               if p.requires_grad and p.grad is not None]
        what = nonfinite_problem(trainer.nonfinite_losses, grads)
        trainer.nonfinite_losses.zero_()
        if what:
            step = state.global_step + 1
            close_progress_bars(trainer)
            raise NonFiniteTraining(
                f"training stopped at optimizer step {step}: the {what} is not finite (NaN or inf), so the adapter "
                f"would be ruined; lower LEARNING_RATE (now {args.learning_rate:g}) and check the training data for "
                f"broken rows, then run the command again (nothing was saved as finished)")


class CheckpointCallback(TrainerCallback):
    """Marks each saved checkpoint complete (once every process has written its part), then keeps
    the newest `keep`, the best, and (SELECT_ON=rougeL_faithful) every checkpoint that may still
    become the best (train/selection.py)."""

    def __init__(self, keep: int, rule: str = "rougeL", margin: float = 0.0):
        self.keep, self.rule, self.margin = keep, rule, margin

    def on_save(self, args, state, control, **kwargs):
        if args.world_size > 1:   # other processes write their own RNG state into the same checkpoint
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir)
        newest = folder / f"checkpoint-{state.global_step}"
        mark_complete(newest)
        if not self.keep:
            return
        protected = {newest.resolve()}
        if state.best_model_checkpoint:
            protected.add(Path(state.best_model_checkpoint).resolve())
        complete = complete_checkpoints(folder)
        candidates = selection.select(selection.evaluations(state.log_history), self.rule, self.margin).keep
        protected |= {c.resolve() for c in complete if checkpoint_step(c) in candidates}
        excess = len(complete) - max(self.keep, len(protected))
        for checkpoint in [c for c in complete if c.resolve() not in protected][:max(0, excess)]:
            drop_checkpoint(checkpoint)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _TrainingClock(TrainerCallback):
    """Wall time from the first to the last training step (setup and final loading excluded)."""

    def __init__(self, session: dict):
        self.session, self.start = session, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self.start is not None:
            self.session["wall_seconds"] += time.perf_counter() - self.start


class SummaryTrainerMixin:
    """Put before a Trainer class: evaluations add ROUGE of generated summaries (key `eval_rougeL`
    etc.) and pick the best checkpoint by SELECT_ON; training steps are counted (samples, real
    tokens), keep a resumable data order and stop on a non-finite loss."""

    def __init__(self, *args, generation_eval: GenerationEval | None = None, select_on: str = "rougeL",
                 faithfulness_margin: float = 0.05, eval_precision: str = "fp32", **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_eval, self.eval_precision = generation_eval, eval_precision
        self.select_on, self.faithfulness_margin = select_on, faithfulness_margin
        self.selection = selection.Selection(None, None)
        self.session = {"samples": 0, "tokens": 0, "padded_tokens": 0, "eval_seconds": 0.0, "save_seconds": 0.0,
                        "wall_seconds": 0.0, "start_step": 0, "generation_seconds": 0.0, "loss_seconds": 0.0}
        self.nonfinite_losses = torch.zeros((), dtype=torch.int64, device=self.args.device)
        self.add_callback(_TrainingClock(self.session))
        self.add_callback(_FiniteGuard(self))

    # -- what a trainer with other batches overrides ------------------------------------------------
    def batch_counts(self, inputs: dict) -> tuple[int, int, int]:
        """(samples, real tokens, padded tokens) of one micro-batch."""
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        return int(ids.shape[0]), int(mask.sum()) if mask is not None else int(ids.numel()), int(ids.numel())

    def row_lengths(self, dataset) -> list[int] | None:
        """Tokens of each training row, for the length-grouped order (None: no grouping)."""
        if "input_ids" not in getattr(dataset, "column_names", ()):
            return None
        return [len(ids) for ids in dataset["input_ids"]]

    def step_inputs(self, inputs: dict) -> dict:
        """The batch the training step runs on (a trainer may trim it)."""
        return inputs

    # -- training ------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = self.row_lengths(dataset) if dataset is not None else None
        if self.args.train_sampling_strategy != "group_by_length" or lengths is None:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSeededLengthSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths, seed)

    def _get_eval_sampler(self, eval_dataset):
        """Validation batches grouped by `row_lengths` too (transformers infers lengths only from
        input_ids, which preference pairs do not have), with transformers' seeded generator."""
        if eval_dataset is None or self.args.train_sampling_strategy != "group_by_length":
            return super()._get_eval_sampler(eval_dataset)
        lengths = self.row_lengths(eval_dataset)
        if lengths is None:   # rows of unknown shape: in order
            return torch.utils.data.SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(self.args.eval_batch_size, lengths=lengths,
                                    generator=torch.Generator().manual_seed(seed))

    def training_step(self, model, inputs, num_items_in_batch=None):
        samples, tokens, padded = self.batch_counts(inputs)
        self.session["samples"] += samples
        self.session["tokens"] += tokens
        self.session["padded_tokens"] += padded
        loss = super().training_step(model, self.step_inputs(inputs), num_items_in_batch)
        self.nonfinite_losses += (~torch.isfinite(loss.detach())).to(self.nonfinite_losses.device).sum()
        return loss

    # -- evaluations -----------------------------------------------------------------------------------
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        start = time.perf_counter()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        loss_seconds = time.perf_counter() - start
        output.metrics[f"{metric_key_prefix}_loss_seconds"] = round(loss_seconds, 2)
        self.session["loss_seconds"] += loss_seconds
        if self.generation_eval is not None and metric_key_prefix == "eval":
            generation_start = time.perf_counter()
            output.metrics.update(self.generated_metrics(metric_key_prefix))
            self.session["generation_seconds"] += time.perf_counter() - generation_start
        self.session["eval_seconds"] += time.perf_counter() - start
        return output

    def evaluate(self, *args, **kwargs) -> dict:
        metrics = super().evaluate(*args, **kwargs)
        if self.generation_eval is not None and self.state.global_step == 0:   # the zero-shot evaluation
            self.say_evaluation(metrics)
        return metrics

    def fixed_rows(self) -> int | None:
        """The rows the first evaluation of this run generated within its budget (None before it)."""
        return next((int(h["eval_generated_rows"]) for h in self.state.log_history if "eval_generated_rows" in h),
                    None)

    def generation_precision(self):
        """The context in-training generation runs in: fp32 (autocast off, as the evaluation stage
        generates from the fp32 weights), or EVAL_PRECISION=autocast: the training autocast."""
        if self.eval_precision == "autocast":
            return self.accelerator.autocast()
        return torch.autocast(device_type=self.args.device.type, enabled=False)

    def generated_metrics(self, prefix: str = "eval") -> dict:
        """Generate summaries for the evaluation subset (each process a share, in fp32 unless
        EVAL_PRECISION=autocast) and score them (train/evaluation.py)."""
        from accelerate.utils import gather_object
        spec, model = self.generation_eval, self.model
        was_training = model.training
        model.eval()
        loaded = LoadedModel(model=model, tokenizer=spec.tokenizer, family=family_of(spec.family), backend=HF,
                             name=spec.base, base=spec.base, device=self.args.device, config=model.config,
                             generation_config=unwrap(model).generation_config)
        world = self.args.world_size

        def summarize_rows(positions: list[int]):
            result = summarize(loaded, [spec.dialogues[i] for i in positions], spec.settings, spec.batch_size,
                               spec.max_input_length, spec.instruction, progress=False)
            return result.summaries, result.generated

        def agree(seconds: float) -> float:
            return max(gather_object([seconds])) if world > 1 else seconds

        def collect(items: list) -> list:
            return gather_object(items) if world > 1 else items

        try:
            # exact speed-ups off: the backend keeps the prompt prefix's KV cache per model object, which
            # here changes its weights between evaluations (a later evaluation would decode from the
            # first evaluation's prefix keys and values)
            with self.generation_precision(), exact_speedups(False):
                generated = evaluation.generate_rows(spec, summarize_rows, self.fixed_rows(), self.args.process_index,
                                                     world, agree, collect)
        finally:
            model.train(was_training)
        scores = evaluation.score(spec, generated, prefix)
        scores[f"{prefix}_budget_stopped"] = int(generated.budget_stopped)
        return scores

    def _determine_best_metric(self, metrics: dict, trial) -> bool:
        """The best checkpoint under SELECT_ON, decided again from the whole log history (see
        train/selection.py); True when it is the checkpoint of this step."""
        if self.generation_eval is None:
            return super()._determine_best_metric(metrics, trial)
        self.selection = selection.select(selection.evaluations(self.state.log_history), self.select_on,
                                          self.faithfulness_margin)
        self.say_evaluation(metrics)
        if self.selection.best_step is None:
            return False
        self.state.best_metric = self.selection.best_rougeL
        self.state.best_global_step = self.selection.best_step
        return self.selection.best_step == self.state.global_step

    def say_evaluation(self, metrics: dict) -> None:
        """One line per evaluation: scores, what it cost, and the best checkpoint so far."""
        if not self.is_world_process_zero():
            return
        spec, m = self.generation_eval, metrics
        rate = m.get(f"eval_{evaluation.RATE_KEY}")
        budget = spec.budget_seconds
        over = budget and m.get("eval_generation_seconds", 0) > budget and not m.get("eval_budget_stopped")
        cost = (f"generation {m.get('eval_generation_seconds')} s for {m.get('eval_generated_rows')} rows"
                + (f" (budget {budget:g} s{', stopped there' if m.get('eval_budget_stopped') else ''}"
                   f"{', OVER: the rows are fixed by the first evaluation' if over else ''})" if budget else "")
                + f", loss {m.get('eval_loss_seconds')} s")
        best = self.selection.best_step
        tqdm.write(f"evaluation at step {self.state.global_step}: loss {m.get('eval_loss', float('nan')):.4f}, "
                 f"ROUGE-L {m.get('eval_rougeL')}, unsupported mentions "
                 f"{'n/a' if rate is None else f'{100 * rate:.1f}%'}; {cost}; best so far: "
                 f"{'none yet' if best is None else f'step {best}'}")

    def _save_checkpoint(self, model, trial):
        start = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.session["save_seconds"] += time.perf_counter() - start

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # training logs carry memory, so the tracker shows it
            logs["rss_mb"] = peak_rss_mb()
            if torch.cuda.is_available():
                logs["gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        resume = kwargs.get("resume_from_checkpoint")
        if isinstance(resume, str):
            state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
            self.session["start_step"] = state.global_step
        return super().train(*args, **kwargs)

    def throughput(self) -> dict:
        """Training speed of this session (evaluation and checkpoint time excluded), all processes."""
        counts = torch.tensor([self.session[k] for k in ("samples", "tokens", "padded_tokens")],
                              dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        samples, tokens, padded = (float(v) for v in counts.tolist())
        seconds = max(1e-9, self.session["wall_seconds"] - self.session["eval_seconds"] - self.session["save_seconds"])
        wall = self.session["wall_seconds"]
        return {"train_seconds": round(seconds, 2), "samples": int(samples), "tokens": int(tokens),
                "samples_per_s": round(samples / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                "padded_tokens_per_s": round(padded / seconds, 1),
                "eval_seconds": round(self.session["eval_seconds"], 2),
                "generation_seconds": round(self.session["generation_seconds"], 2),
                "eval_loss_seconds": round(self.session["loss_seconds"], 2),
                "wall_seconds": round(wall, 2),
                "generation_share": round(self.session["generation_seconds"] / wall, 4) if wall else None}
