"""The machinery behind train_bart_lora.py: one LoRA/QLoRA trainer for seq2seq and causal models.

* Tokenization for both families through the shared prompts (prompts.py), so a model is taught
  the way generation.py will ask it. Causal rows are prompt + summary + EOS with the loss on the
  summary tokens only (labels carry -100 on the prompt, so EOS stays a target even when
  pad == eos); the dialogue is cut to fit, never the summary's EOS. Seq2seq rows are the
  dialogue (with the model's task prefix) and `text_target` labels. Nothing is padded in `map`;
  the tokenized splits are cached under a fingerprint of the tokenizer, prompt, lengths and rows.
* A dynamic-padding collator (labels padded with -100; pad to a multiple of 8 on GPU).
* LoRA targets per architecture, QLoRA preparation, a clear error listing the module names.
* The run folder: `checkpoints/run_config.json` records the settings of an unfinished run; a
  checkpoint counts only once `ftf_complete.json` lists every file in it with its size (written
  after the Trainer has saved everything), so a SIGKILL at any moment leaves the newest complete
  checkpoint usable. RESUME=auto continues from it when the settings match; other settings are
  an error unless OVERWRITE. The finished folder holds exactly the files named in its
  run_config.json "files" list.
* A Trainer whose every evaluation adds ROUGE of generated summaries (generation.summarize +
  metrics.py, shared across processes) to the validation loss, and which measures throughput.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import re
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from transformers import (DataCollatorForSeq2Seq, EarlyStoppingCallback, Trainer, TrainerCallback, TrainerState,
                          TrainingArguments)

from finetuneflow.contract.record import RunRecord, describe_inputs, read_record, write_record
from finetuneflow.contract.errors import UserError
from finetuneflow.engine.generation import GenerationSettings, summarize
from finetuneflow.contract.io import atomic_path, atomic_write_json
from finetuneflow.quality.metrics import ROUGE_KEYS, mean_scores, rouge_per_sample
from finetuneflow.model.backends.hf import BACKEND as HF
from finetuneflow.model.backends.hf import disable_cpu_bf16_kernels, unwrap
from finetuneflow.model.family import CAUSAL, SEQ2SEQ, PromptSpec, family_of
from finetuneflow.model.loading import LoadedModel, is_adapter_dir, load_model

STAGE = "train_bart_lora"
CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "ftf_complete.json"
TOKENIZATION_VERSION = 2          # bump when encode_example changes, so old caches are not reused
LLAMA_STYLE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Settings that do not change what is trained, so a resumed run may differ in them.
IDENTITY_IGNORED = frozenset({"RESUME", "OVERWRITE", "KEEP_CHECKPOINTS", "LOGGING_STEPS", "CACHE_DIR",
                              "OUTPUT_DIR", "ALLOW_CPU_FALLBACK"})
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RENAMED = {"MODEL_NAME": "MODEL"}   # old setting names (first-wave run folders record them)


# ----------------------------------------------------------------------------- settings and data

def check_lengths(model_config, family: str, model_name: str, max_input: int, max_target: int) -> int | None:
    """Fail before loading weights when the requested lengths exceed the model's positions."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if not limit:
        return None
    if family == CAUSAL and max_input + max_target > limit:
        raise UserError(f"MAX_INPUT_LENGTH={max_input} + MAX_TARGET_LENGTH={max_target} = {max_input + max_target} "
                        f"tokens is more than {model_name} allows ({limit} positions); lower them to sum to <= {limit}")
    if family == SEQ2SEQ:
        for name, value in (("MAX_INPUT_LENGTH", max_input), ("MAX_TARGET_LENGTH", max_target)):
            if value > limit:
                raise UserError(f"{name}={value} is more than {model_name} allows ({limit} tokens); "
                                f"set --{name}={limit} or less")
    return int(limit)


# ----------------------------------------------------------------------------- tokenization

@dataclass(frozen=True)
class EncodingSpec:
    family: str
    instruction: str
    seq2seq_prefix: str
    max_input_length: int
    max_target_length: int


def encode_example(tokenizer, spec: EncodingSpec, dialogue: str, summary: str) -> dict:
    """input_ids / attention_mask / labels for one row, plus whether input or target was cut."""
    return family_of(spec.family).training_example(tokenizer, PromptSpec(spec.instruction, spec.seq2seq_prefix),
                                                   dialogue, summary, spec.max_input_length, spec.max_target_length)


def _digest(*parts) -> str:
    """sha256 of JSON-able parts (pass lists, not datasets Columns: their str() is abbreviated)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return _digest(type(tokenizer).__name__, vocabulary, getattr(tokenizer, "chat_template", None),
                   tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def tokenize_split(rows: datasets.Dataset, tokenizer, spec: EncodingSpec, cache_dir: Path | None,
                   name: str) -> tuple[datasets.Dataset, dict]:
    """Tokenize a split (no padding); reuse the cached result of an identical earlier run.
    Returns the dataset (input_ids, attention_mask, labels) and counts of what was cut."""
    def encode_batch(batch):
        encoded = [encode_example(tokenizer, spec, d, s) for d, s in zip(batch["dialogue"], batch["summary"])]
        return {key: [row[key] for row in encoded] for key in
                ("input_ids", "attention_mask", "labels", "input_truncated", "target_truncated")}

    kwargs, reused = {}, False
    if cache_dir is not None:
        fingerprint = _digest(TOKENIZATION_VERSION, tokenizer_fingerprint(tokenizer), asdict(spec),
                              *(list(rows[column]) for column in ("id", "dialogue", "summary")))
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = cache_dir / f"{name}-{fingerprint[:24]}.arrow"
        reused = cache_file.is_file()
        kwargs = {"cache_file_name": str(cache_file), "new_fingerprint": fingerprint, "load_from_cache_file": True}
    encoded = rows.map(encode_batch, batched=True, remove_columns=rows.column_names, desc=f"tokenize {name}", **kwargs)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    stats = {"rows": len(encoded), "truncated_dialogues": int(sum(encoded["input_truncated"])),
             "truncated_summaries": int(sum(encoded["target_truncated"])),
             "mean_tokens": round(sum(lengths) / max(1, len(lengths)), 1), "max_tokens": max(lengths, default=0),
             "cache": "reused" if reused else ("written" if cache_dir is not None else "off")}
    return encoded.remove_columns(["input_truncated", "target_truncated"]), stats


def make_collator(tokenizer, device: torch.device) -> DataCollatorForSeq2Seq:
    """Pad each batch to its longest row (on the right, labels with -100); multiples of 8 on GPU."""
    padder = copy.deepcopy(tokenizer)
    padder.padding_side = "right"   # training pads right for both families; generation pads causal left itself
    return DataCollatorForSeq2Seq(padder, padding=True, label_pad_token_id=-100,
                                  pad_to_multiple_of=8 if device.type == "cuda" else None)


# ----------------------------------------------------------------------------- model, LoRA, QLoRA

def four_bit_problem(device: torch.device) -> str | None:
    """Why bitsandbytes 4-bit cannot run on `device` here, or None when it can."""
    try:
        import bitsandbytes.functional as bnb_functional
        weight = torch.randn(64, 64, device=device,
                             dtype=torch.float16 if device.type == "cuda" else torch.float32)
        bnb_functional.quantize_4bit(weight, quant_type="nf4")
        return None
    except Exception as exc:  # missing library, no kernel for this device, ...
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {text}"


def load_for_training(name: str, load_in_4bit: bool, allow_fallback: bool,
                      device: torch.device) -> tuple[LoadedModel, bool]:
    """The base model ready for LoRA; returns it and whether it really is 4-bit."""
    if is_adapter_dir(name):
        raise UserError(f"MODEL {name} is an adapter folder; pass its base model (see its run_config.json "
                        f"'base_model') or merge it first with merge_bart_lora.py")
    if load_in_4bit:
        problem = four_bit_problem(device)
        if problem and not allow_fallback:
            raise UserError(f"LOAD_IN_4BIT=True but bitsandbytes 4-bit does not work on this {device.type} "
                            f"({problem}); install bitsandbytes>=0.45, or pass --ALLOW_CPU_FALLBACK=True to "
                            f"train without 4-bit")
        if problem:
            print(f"4-bit unavailable on {device.type} ({problem}): training the full-precision model "
                  f"(ALLOW_CPU_FALLBACK=True)")
            load_in_4bit = False
    return load_model(name, load_in_4bit=load_in_4bit, device=device, for_training=True), load_in_4bit


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct last-name parts of every linear layer (what LoRA can target)."""
    from transformers.pytorch_utils import Conv1D
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if name and isinstance(module, (torch.nn.Linear, Conv1D))})


def normalize_targets(value) -> str | list[str] | None:
    """TARGET_MODULES as given on the command line: None/"auto", "all-linear", "a,b" or a list."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "none")):
        return None
    if isinstance(value, str):
        if value.strip() == "all-linear":
            return "all-linear"
        return [part.strip() for part in value.split(",") if part.strip()]
    return [str(v) for v in value]


def resolve_target_modules(model: torch.nn.Module, requested, family: str) -> str | list[str]:
    """The LoRA targets: the user's, or "all-linear", or the usual ones for the architecture."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    requested = normalize_targets(requested)
    names = linear_module_names(model)
    model_type = getattr(model.config, "model_type", "?")
    if requested == "all-linear":
        return requested
    if requested is None:
        if family == CAUSAL and set(LLAMA_STYLE_TARGETS) <= set(names):
            return list(LLAMA_STYLE_TARGETS)
        default = DEFAULTS.get(model_type)
        if default and set(default) <= set(names):
            return list(default)
        raise UserError(f"no default LoRA targets for model type {model_type!r}; set --TARGET_MODULES=all-linear "
                        f"or some of its linear modules: {', '.join(names)}")
    full_names = [name for name, _ in model.named_modules()]
    missing = [t for t in requested if t not in names and not any(n.endswith("." + t) for n in full_names)]
    if missing:
        raise UserError(f"TARGET_MODULES {', '.join(missing)} not found in {model_type!r}; its linear modules are: "
                        f"{', '.join(names)} (or use --TARGET_MODULES=all-linear)")
    return requested


def add_lora(loaded: LoadedModel, targets, r: int, alpha: int, dropout: float, in_4bit: bool,
             gradient_checkpointing: bool):
    """Wrap the base model with fresh LoRA adapters (QLoRA: after prepare_model_for_kbit_training)."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    model = loaded.model
    if in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    task = TaskType.SEQ_2_SEQ_LM if loaded.family == SEQ2SEQ else TaskType.CAUSAL_LM
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task)
    model = get_peft_model(model, config)
    if in_4bit and loaded.device.type == "cpu":
        disable_cpu_bf16_kernels(model)  # else training stops silently after an eval's no-grad forward
    return model


def process_state():
    """accelerate's view of this process (one of several under `accelerate launch`). Without a GPU, or
    with ACCELERATE_USE_CPU, it is a CPU process, so several of them join through gloo (multi-CPU DDP)."""
    from accelerate import PartialState
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return PartialState(cpu=use_cpu)


def precision(device: torch.device) -> str:
    """Mixed precision by device: bf16 where supported, else fp16 on GPU; fp32 on CPU."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# ----------------------------------------------------------------------------- the run folder

def _checkpoint_step(path: Path) -> int:
    match = _CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else -1


def mark_complete(checkpoint: Path) -> None:
    """Record every file of a saved checkpoint with its size; only then does it count."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != COMPLETE_MARKER and not p.name.endswith(".tmp")}
    atomic_write_json(checkpoint / COMPLETE_MARKER, {"files": files})


def is_complete(checkpoint: Path) -> bool:
    try:
        files = json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(files) and all((checkpoint / name).is_file() and (checkpoint / name).stat().st_size == size
                               for name, size in files.items())


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _checkpoint_step(p) >= 0 and is_complete(p)]
    return sorted(found, key=_checkpoint_step)


def drop_checkpoint(checkpoint: Path) -> None:
    """Unmark first, so a kill halfway through the deletion leaves an ignored, not a broken, checkpoint."""
    (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def run_identity(config: dict, inputs: dict) -> dict:
    """The settings and input contents that define a run (input paths may be recorded absolute
    or relative to the project root, so only the file contents count)."""
    kept = {RENAMED.get(k, k): v for k, v in config.items() if RENAMED.get(k, k) not in IDENTITY_IGNORED}
    contents = sorted(json.dumps(v, sort_keys=True) for v in inputs.values())
    return json.loads(json.dumps({"config": kept, "inputs": contents}, default=str, sort_keys=True))


def identity_differences(saved: dict, current: dict) -> list[str]:
    old, new = saved["config"], current["config"]
    diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if saved["inputs"] != current["inputs"]:
        diffs.append("the input data changed")
    return diffs


@dataclass
class RunPlan:
    out: Path
    finished: bool = False            # OUTPUT_DIR already holds a finished run with these settings
    wipe: bool = False                # OVERWRITE: remove the earlier run first
    resume_from: Path | None = None   # the checkpoint to continue from

    @property
    def checkpoints(self) -> Path:
        return self.out / CHECKPOINTS


def plan_run(out: Path, cfg: dict, input_files: list, resume: str, overwrite: bool) -> RunPlan:
    """Decide, without touching anything, whether to start, resume, skip or refuse."""
    plan = RunPlan(out)
    finished, unfinished = read_record(out), read_record(out / CHECKPOINTS)
    finished = finished if finished and finished.stage == STAGE else None
    unfinished = unfinished if unfinished and unfinished.stage == STAGE else None
    if finished is None and unfinished is None:
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"OUTPUT_DIR {out} already holds files that are not from train_bart_lora.py; "
                            f"choose an empty or new --OUTPUT_DIR")
        return plan
    if overwrite:
        plan.wipe = True
        return plan
    saved = finished or unfinished
    current = run_identity(cfg, describe_inputs(input_files))
    diffs = identity_differences(run_identity(saved.config, saved.inputs), current)
    if diffs:
        state = "finished" if finished else "unfinished"
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise UserError(f"OUTPUT_DIR {out} holds a {state} run with other settings ({shown}); pass "
                        f"--OVERWRITE=True to replace it, or choose another --OUTPUT_DIR")
    if finished:
        plan.finished = True
        return plan
    available = complete_checkpoints(out / CHECKPOINTS)
    if resume == "auto":
        plan.resume_from = available[-1] if available else None
    elif resume != "never":
        wanted = Path(resume).name
        match = [c for c in available if c.name == wanted]
        if not match:
            raise UserError(f"RESUME={resume!r}: no complete checkpoint of that name in {out / CHECKPOINTS} "
                            f"(complete: {', '.join(c.name for c in available) or 'none'}); use auto or never")
        plan.resume_from = match[0]
    return plan


def prepare_run_dir(plan: RunPlan, cfg: dict, input_files: list, keep_checkpoints: bool) -> None:
    """Carry out the plan on disk (main process only)."""
    out = plan.out
    if plan.wipe:
        record = read_record(out)
        for name in (record.extra.get("files", []) if record else []):
            if "/" not in name and name not in ("", ".", ".."):
                (out / name).unlink(missing_ok=True)
        (out / "run_config.json").unlink(missing_ok=True)
        shutil.rmtree(plan.checkpoints, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".final-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if plan.finished:
        if not keep_checkpoints:
            shutil.rmtree(plan.checkpoints, ignore_errors=True)
        return
    if plan.resume_from is None:
        shutil.rmtree(plan.checkpoints, ignore_errors=True)
    else:  # drop half-written checkpoints and any newer than the chosen one
        for path in plan.checkpoints.iterdir():
            if path.is_dir() and (not is_complete(path) or _checkpoint_step(path) > _checkpoint_step(plan.resume_from)):
                drop_checkpoint(path)
    plan.checkpoints.mkdir(parents=True, exist_ok=True)
    write_record(plan.checkpoints, RunRecord(STAGE, extra={"status": "unfinished"}), cfg, input_files)


# ----------------------------------------------------------------------------- the trainer

@dataclass
class GenerationEval:
    """What an evaluation generates from and scores against."""
    dialogues: list[str]
    references: list[str]
    settings: GenerationSettings
    batch_size: int
    max_input_length: int
    instruction: str
    family: str
    base: str
    tokenizer: object


class CheckpointCallback(TrainerCallback):
    """Marks each saved checkpoint complete, then keeps the newest `keep` (and always the best)."""

    def __init__(self, keep: int):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
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
        excess = len(complete) - max(self.keep, len(protected))
        for checkpoint in [c for c in complete if c.resolve() not in protected][:max(0, excess)]:
            drop_checkpoint(checkpoint)


def training_callbacks(save_total_limit: int, early_stopping_patience: int) -> list:
    callbacks = [CheckpointCallback(save_total_limit)]
    if early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=early_stopping_patience))
    return callbacks


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


def loss_follows_num_items(model: torch.nn.Module) -> bool:
    """Whether the model's loss uses transformers' shared loss functions (which honour
    `num_items_in_batch`, the token count over all accumulated micro-batches)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "self.loss_function(" in inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return True


class SummarizationTrainer(Trainer):
    """A Trainer whose evaluations add ROUGE of generated summaries (key `eval_rougeL` etc.) and
    which counts samples and real (non-padding) tokens of its training steps."""

    def __init__(self, *args, generation_eval: GenerationEval | None = None, family: str = CAUSAL, **kwargs):
        super().__init__(*args, **kwargs)
        if not loss_follows_num_items(self.model):
            # BART/T5 accept **kwargs but average their loss per micro-batch themselves; without this the
            # Trainer would neither pass the token count nor divide by GRAD_ACCUM (loss and grads x GRAD_ACCUM).
            self.model_accepts_loss_kwargs = False
            self.loss_is_scaled_for_ga = False
        self.generation_eval = generation_eval
        self.family = family
        self.session = {"samples": 0, "tokens": 0, "padded_tokens": 0, "eval_seconds": 0.0, "save_seconds": 0.0,
                        "wall_seconds": 0.0, "start_step": 0}
        self.add_callback(_TrainingClock(self.session))

    def training_step(self, model, inputs, num_items_in_batch=None):
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        self.session["samples"] += int(ids.shape[0])
        self.session["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())
        self.session["padded_tokens"] += int(ids.numel())
        labels = inputs.get("labels")
        if self.family == SEQ2SEQ and labels is not None:   # the decoder's tokens are work too
            pad = self.processing_class.pad_token_id if self.processing_class is not None else None
            self.session["tokens"] += int(((labels != -100) & (labels != pad)).sum())
            self.session["padded_tokens"] += int(labels.numel())
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        start = time.perf_counter()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        if self.generation_eval is not None and metric_key_prefix == "eval":
            output.metrics.update(self.generated_rouge(metric_key_prefix))
        self.session["eval_seconds"] += time.perf_counter() - start
        return output

    def generated_rouge(self, prefix: str = "eval") -> dict:
        """Generate summaries for the validation dialogues (each process a share) and score them."""
        from accelerate.utils import gather_object
        spec, model = self.generation_eval, self.model
        was_training = model.training
        model.eval()
        mine = list(range(self.args.process_index, len(spec.dialogues), self.args.world_size))
        loaded = LoadedModel(model=model, tokenizer=spec.tokenizer, family=family_of(spec.family), backend=HF,
                             name=spec.base, base=spec.base, device=self.args.device, config=model.config,
                             generation_config=unwrap(model).generation_config)
        try:
            result = summarize(loaded, [spec.dialogues[i] for i in mine], spec.settings, spec.batch_size,
                               spec.max_input_length, spec.instruction, progress=False)
        finally:
            model.train(was_training)
        rows = rouge_per_sample(result.summaries, [spec.references[i] for i in mine])
        rows = gather_object(rows) if self.args.world_size > 1 else rows
        seconds = max(gather_object([result.seconds])) if self.args.world_size > 1 else result.seconds
        scores = {f"{prefix}_{key}": round(value, 4) for key, value in mean_scores(rows).items()}
        scores[f"{prefix}_generation_seconds"] = round(seconds, 2)
        return scores

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
            self.session["start_step"] = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json")).global_step
        return super().train(*args, **kwargs)

    def throughput(self) -> dict:
        """Training speed of this session (evaluation and checkpoint time excluded), all processes."""
        counts = torch.tensor([self.session[k] for k in ("samples", "tokens", "padded_tokens")],
                              dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        samples, tokens, padded = (float(v) for v in counts.tolist())
        seconds = max(1e-9, self.session["wall_seconds"] - self.session["eval_seconds"] - self.session["save_seconds"])
        return {"train_seconds": round(seconds, 2), "samples": int(samples), "tokens": int(tokens),
                "samples_per_s": round(samples / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                "padded_tokens_per_s": round(padded / seconds, 1),
                "eval_seconds": round(self.session["eval_seconds"], 2)}


def training_arguments(cfg: dict, plan: RunPlan, device: torch.device, report_to: str | list) -> TrainingArguments:
    """The Trainer settings derived from the script's constants."""
    strategy = "steps" if cfg["EVAL_STEPS"] else "epoch"
    mixed = precision(device)
    return TrainingArguments(
        output_dir=str(plan.checkpoints), per_device_train_batch_size=cfg["BATCH_SIZE"],
        per_device_eval_batch_size=cfg["EVAL_BATCH_SIZE"], gradient_accumulation_steps=cfg["GRAD_ACCUM"],
        learning_rate=cfg["LEARNING_RATE"], num_train_epochs=cfg["EPOCHS"], max_steps=cfg["MAX_STEPS"] or -1,
        eval_strategy=strategy, save_strategy=strategy, eval_steps=cfg["EVAL_STEPS"] or None,
        save_steps=cfg["EVAL_STEPS"] or 500, save_total_limit=None,   # CheckpointCallback rotates
        load_best_model_at_end=True, metric_for_best_model="rougeL", greater_is_better=True,
        eval_on_start=bool(cfg["EVAL_ON_START"]) and plan.resume_from is None,
        logging_steps=cfg["LOGGING_STEPS"], logging_first_step=True, train_sampling_strategy="group_by_length",
        bf16=mixed == "bf16", fp16=mixed == "fp16", use_cpu=device.type == "cpu",
        activation_checkpointing=cfg["GRADIENT_CHECKPOINTING"],
        activation_checkpointing_kwargs={"use_reentrant": False}, seed=cfg["SEED"], data_seed=cfg["SEED"],
        report_to=report_to, label_names=["labels"], dataloader_pin_memory=device.type == "cuda",
        ddp_find_unused_parameters=False, save_only_model=False)


# ----------------------------------------------------------------------------- outputs

def train_metrics(trainer: SummarizationTrainer, extra: dict) -> dict:
    """Loss curve, every evaluation, the best step, throughput and peak memory."""
    history = trainer.state.log_history
    curve = [{"step": h["step"], "epoch": round(h.get("epoch") or 0, 4), "loss": round(h["loss"], 5),
              "learning_rate": h.get("learning_rate"), "grad_norm": h.get("grad_norm")}
             for h in history if "loss" in h]
    evals_by_step = {}
    for h in history:
        if "eval_loss" in h:
            evals_by_step[h["step"]] = {"step": h["step"], "epoch": round(h.get("epoch") or 0, 4),
                                        "eval_loss": round(h["eval_loss"], 5),
                                        **{k: h.get(f"eval_{k}") for k in ROUGE_KEYS},
                                        "generation_seconds": h.get("eval_generation_seconds")}
    evals = [evals_by_step[s] for s in sorted(evals_by_step)]
    zero_shot = evals_by_step.get(0)
    state = trainer.state
    speed = trainer.throughput()
    steps_run = state.global_step - trainer.session["start_step"]
    speed["seconds_per_step"] = round(speed["train_seconds"] / steps_run, 3) if steps_run else None
    memory = {"peak_rss_mb": peak_rss_mb()}
    if torch.cuda.is_available():
        memory["peak_gpu_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"global_step": state.global_step, "epochs": round(state.epoch or 0, 4),
            "resumed_from_step": trainer.session["start_step"] or None,
            "best_step": state.best_global_step, "best_rougeL": state.best_metric,
            "zero_shot_rougeL": zero_shot["rougeL"] if zero_shot else None,
            "final_train_loss": curve[-1]["loss"] if curve else None,
            "loss_curve": curve, "evals": evals, "throughput": speed, "memory": memory, **extra}


def plot_loss_curve(metrics: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    curve, evals = metrics["loss_curve"], metrics["evals"]
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label="train loss", color="#4C72B0")
    ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="validation loss", color="#DD8452")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    rouge = ax.twinx()
    rouge.plot([e["step"] for e in evals], [e["rougeL"] for e in evals], "s--", label="validation ROUGE-L",
               color="#55A868")
    rouge.set_ylabel("ROUGE-L (generated)")
    if metrics.get("best_step") is not None:
        ax.axvline(metrics["best_step"], color="grey", linestyle=":", label=f"best step {metrics['best_step']}")
    lines = ax.get_legend_handles_labels()[0] + rouge.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize=8)
    ax.set_title("training loss and validation ROUGE-L")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_outputs(plan: RunPlan, model, tokenizer, metrics: dict, cfg: dict, input_files: list, record: RunRecord,
                 keep_checkpoints: bool) -> list[str]:
    """Write the adapter folder: every file is staged, then moved in; run_config.json comes last
    and marks the run finished. Returns the file names."""
    out = plan.out
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".final-"))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        (staging / "README.md").unlink(missing_ok=True)   # PEFT's model-card stub is not part of the contract
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "train_metrics.json", metrics)
        plot_loss_curve(metrics, staging / "loss_curve.png")
        files = sorted(p.name for p in staging.iterdir() if p.is_file()) + ["run_config.json"]
        for name in files[:-1]:
            os.replace(staging / name, out / name)
        record.extra["files"] = sorted(files)
        write_record(out, record, cfg, input_files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_checkpoints:
        shutil.rmtree(plan.checkpoints, ignore_errors=True)
    return sorted(files)
