"""The Trainer for OBJECTIVE=sft (the reference summaries), and the Trainer settings every
objective shares.

`SummarizationTrainer` is transformers' Trainer with the stage's evaluations, counts, resumable
order and finite guard (train/trainer_core.py), plus what is particular to learning the
references: the causal loss computed only where a summary token is predicted (`logits_to_keep`),
BART/T5 losses scaled for gradient accumulation, and the decoder's tokens counted as work.
Mixed precision is autocast only (model/precision.py): the weights and AdamW stay fp32.
`training_argument_values` is what every trainer of the stage is configured with (TRL's
DPOConfig/ORPOConfig take the same values, train/preference.py).
"""
from __future__ import annotations

import inspect
import os

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

from finetuneflow.model.backends.hf import unwrap
from finetuneflow.model.precision import TrainingPrecision
from finetuneflow.train.evaluation import GenerationEval
from finetuneflow.train.run_dir import RunPlan
from finetuneflow.train.settings import TrainSettings
from finetuneflow.train.trainer_core import (CheckpointCallback, EpochSeededLengthSampler, NonFiniteTraining,
                                             SummaryTrainerMixin, nonfinite_problem, peak_rss_mb)

__all__ = ["CheckpointCallback", "EpochSeededLengthSampler", "GenerationEval", "NonFiniteTraining",
           "SummarizationTrainer", "nonfinite_problem", "peak_rss_mb", "process_state", "training_arguments",
           "training_argument_values", "training_callbacks"]


def loss_follows_num_items(model: torch.nn.Module) -> bool:
    """Whether the model's loss uses transformers' shared loss functions (which honour
    `num_items_in_batch`, the token count over all accumulated micro-batches)."""
    base = unwrap(model)
    try:
        return "self.loss_function(" in inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return True


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the (causal) model can compute logits for chosen positions only (`logits_to_keep`)."""
    try:
        return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def summary_logits_only(inputs: dict) -> dict:
    """Causal rows carry labels (-100 elsewhere) on the summary only, so only the positions that
    predict a summary token need the vocabulary projection and the cross-entropy (~90% of the
    logits of a DialogSum row are prompt positions): keep the span of positions from the one
    before the batch's first label to its last label (`logits_to_keep`, one span for the batch;
    group_by_length keeps the rows of a batch alike) and the labels over the same span. The
    model's loss shifts the sliced labels exactly as it shifts full ones, so the loss and the
    gradients are the same as with every position."""
    labels = inputs.get("labels")
    if labels is None or labels.dim() != 2:
        return inputs
    targets = (labels != -100).any(dim=0).nonzero().flatten()
    if not len(targets):
        return inputs
    first, last = max(0, int(targets[0]) - 1), int(targets[-1])
    return {**inputs, "labels": labels[:, first:last + 1],
            "logits_to_keep": torch.arange(first, last + 1, device=labels.device)}


class SummarizationTrainer(SummaryTrainerMixin, Trainer):
    """transformers' Trainer for the reference summaries (OBJECTIVE=sft), with the stage's
    evaluations, counts, resumable order and finite guard (train/trainer_core.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not loss_follows_num_items(self.model):
            # BART/T5 accept **kwargs but average their loss per micro-batch themselves; without this the
            # Trainer would neither pass the token count nor divide by GRAD_ACCUM (loss and grads x GRAD_ACCUM).
            self.model_accepts_loss_kwargs = False
            self.loss_is_scaled_for_ga = False
        self.decoder_tokens_count = bool(getattr(unwrap(self.model).config, "is_encoder_decoder", False))
        self.slice_logits = not self.decoder_tokens_count and accepts_logits_to_keep(self.model)

    def batch_counts(self, inputs: dict) -> tuple[int, int, int]:
        samples, tokens, padded = super().batch_counts(inputs)
        labels = inputs.get("labels")
        if self.decoder_tokens_count and labels is not None:   # the decoder's tokens are work too
            pad = self.processing_class.pad_token_id if self.processing_class is not None else None
            tokens += int(((labels != -100) & (labels != pad)).sum())
            padded += int(labels.numel())
        return samples, tokens, padded

    def step_inputs(self, inputs: dict) -> dict:
        return summary_logits_only(inputs) if self.slice_logits else inputs

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if self.slice_logits and prediction_loss_only:
            inputs = summary_logits_only(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


# ----------------------------------------------------------------------------- process and arguments

def process_state():
    """accelerate's view of this process (one of several under `accelerate launch`). Without a GPU, or
    with ACCELERATE_USE_CPU, it is a CPU process, so several of them join through gloo (multi-CPU DDP)."""
    from accelerate import PartialState
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=use_cpu)


def training_callbacks(save_total_limit: int, early_stopping_patience: int, select_on: str = "rougeL",
                       margin: float = 0.0) -> list:
    callbacks = [CheckpointCallback(save_total_limit, select_on, margin)]
    if early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    return callbacks


def training_argument_values(settings: TrainSettings, plan: RunPlan, device: torch.device, report_to: str | list,
                             precision: TrainingPrecision) -> dict:
    """The Trainer settings derived from the stage's settings (TrainingArguments or a TRL config)."""
    strategy = "steps" if settings.eval_steps else "epoch"
    return dict(
        output_dir=str(plan.checkpoints), per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size, gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate, num_train_epochs=settings.epochs, max_steps=settings.max_steps or -1,
        eval_strategy=strategy, save_strategy=strategy, eval_steps=settings.eval_steps or None,
        save_steps=settings.eval_steps or 500, save_total_limit=None,   # CheckpointCallback rotates
        load_best_model_at_end=True, metric_for_best_model="rougeL", greater_is_better=True,
        eval_on_start=bool(settings.eval_on_start) and plan.resume_from is None,
        logging_steps=settings.logging_steps, logging_first_step=True, train_sampling_strategy="group_by_length",
        bf16=precision.bf16, fp16=precision.fp16, use_cpu=device.type == "cpu",
        activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False}, seed=settings.seed, data_seed=settings.seed,
        report_to=report_to, label_names=["labels"], dataloader_pin_memory=device.type == "cuda",
        ddp_find_unused_parameters=False, save_only_model=False)


def training_arguments(settings: TrainSettings, plan: RunPlan, device: torch.device, report_to: str | list,
                       precision: TrainingPrecision) -> TrainingArguments:
    """The Trainer settings derived from the stage's settings."""
    return TrainingArguments(**training_argument_values(settings, plan, device, report_to, precision))
