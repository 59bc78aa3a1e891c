"""The trainer's settings as one typed object, and the checks that need no model weights.

`TrainSettings.from_config(cfg)` is built once by train_bart_lora.py from its resolved settings;
every library function of this package takes it (or the few values it needs), never the
script's dict. `recorded` keeps the resolved settings exactly as the run record stores them
(upper-case names, the --config file), so the run identity of first-wave folders still matches.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from finetuneflow.contract import architectures as arch
from finetuneflow.contract.data import DataSpec
from finetuneflow.contract.decoding import MBR_FIELDS, GenerationSettings
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.settings import FromConfig

STAGE = "train_bart_lora"
RENAMED = {"MODEL_NAME": "MODEL"}
MBR_SETTINGS = tuple(name.upper() for name in MBR_FIELDS)   # old setting names (first-wave run folders record them)
# Settings that do not change what is trained, so a resumed run may differ in them.
IDENTITY_IGNORED = frozenset({"RESUME", "OVERWRITE", "KEEP_CHECKPOINTS", "LOGGING_STEPS", "CACHE_DIR",
                              "OUTPUT_DIR", "ALLOW_CPU_FALLBACK", "REPORT_TO", "TRACKING_DIR",
                              "DECODING", *MBR_SETTINGS})   # later stages' decoding: recorded, not trained
# Settings added after runs were recorded: a record without one was made before it existed, so it is
# not part of that run's identity (first-wave folders stay recognized).
ADDED_LATER = frozenset({"PRECISION", "EVAL_GENERATE_SAMPLES", "EVAL_BUDGET_SECONDS", "SELECT_ON",
                         "FAITHFULNESS_MARGIN", "REPORT_TO", "TRACKING_DIR", "DECODING", *MBR_SETTINGS})
# Settings added later whose value changes what is trained: a record without one matches only the
# default it now has (an old run was an SFT run with the split seeded by SEED).
ADDED_WITH_DEFAULT = {"OBJECTIVE": "sft", "START_ADAPTER": None, "PREFERENCE_BETA": None,
                      "NEGATIVES": ["name", "number", "speaker", "sentence"], "PAIRS_PER_ROW": 1, "SPLIT_SEED": None,
                      "EVAL_PRECISION": "fp32"}
# Defaults that became None ("family default"): an old record holding the old default matches None.
FORMER_DEFAULTS = {"NUM_BEAMS": 4, "MAX_NEW_TOKENS": 192}
SELECT_ON = ("rougeL", "rougeL_faithful")
SFT = "sft"
PREFERENCE_OBJECTIVES = ("dpo", "orpo")
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class TrainSettings(FromConfig):
    """Every setting of train_bart_lora.py (field = the lower-case setting name). No defaults: a
    setting renamed in the script without renaming it here fails loudly in from_config."""
    model: str
    dataset: str
    hub_config: str | None
    dialogue_column: str | None
    summary_column: str | None
    id_column: str | None
    val_fraction: float
    test_fraction: float
    normalize: bool | None
    train_samples: int
    val_samples: int
    epochs: float
    batch_size: int
    grad_accum: int
    learning_rate: float
    max_input_length: int
    max_target_length: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: str | list | None
    load_in_4bit: bool | None
    allow_cpu_fallback: bool
    gradient_checkpointing: bool
    instruction: str | None
    objective: str
    start_adapter: str | None
    preference_beta: float | None
    negatives: list
    pairs_per_row: int
    num_beams: int | None
    max_new_tokens: int | None
    min_new_tokens: int | None
    no_repeat_ngram_size: int | None
    length_penalty: float | None
    decoding: str | None
    mbr_samples: int | None
    mbr_temperature: float | None
    mbr_top_p: float | None
    mbr_utility: str | None
    mbr_faithful: bool | None
    mbr_seed: int | None
    eval_steps: int
    eval_on_start: bool
    eval_batch_size: int
    eval_generate_samples: int | None
    eval_budget_seconds: float
    eval_precision: str
    select_on: str
    faithfulness_margin: float
    early_stopping_patience: int
    max_steps: int
    logging_steps: int
    save_total_limit: int
    seed: int
    split_seed: int | None
    resume: str
    overwrite: bool
    keep_checkpoints: bool
    cache_dir: str
    output_dir: str
    precision: str
    report_to: str | list
    tracking_dir: str
    recorded: Mapping = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: Mapping, **overrides) -> "TrainSettings":
        return super().from_config(cfg, **{"recorded": cfg, **overrides})

    @property
    def generation(self) -> GenerationSettings:
        """The decoding settings (DECODING=mbr: MBR_SEED None is the training SEED, so every later stage
        inherits the same samples)."""
        seed = self.mbr_seed if self.mbr_seed is not None or self.decoding != "mbr" else self.seed
        return GenerationSettings(self.num_beams, self.max_new_tokens, self.min_new_tokens, self.no_repeat_ngram_size,
                                  self.length_penalty, self.decoding, self.mbr_samples, self.mbr_temperature,
                                  self.mbr_top_p, self.mbr_utility, self.mbr_faithful, seed)

    @property
    def data_seed(self) -> int:
        """The seed of the data split and of the row subsets (SPLIT_SEED, else SEED): several training
        seeds with one SPLIT_SEED keep the same train, validation and test rows."""
        return self.seed if self.split_seed is None else int(self.split_seed)

    @property
    def preference(self) -> bool:
        return self.objective in PREFERENCE_OBJECTIVES

    @property
    def data_spec(self) -> DataSpec:
        return DataSpec(dataset=self.dataset, hub_config=self.hub_config, dialogue_column=self.dialogue_column,
                        summary_column=self.summary_column, id_column=self.id_column, seed=self.data_seed,
                        val_fraction=self.val_fraction, test_fraction=self.test_fraction,
                        normalize=bool(self.normalize))

    def check(self) -> None:
        """Settings that contradict each other (found before anything is loaded or written)."""
        resume = str(self.resume)
        if resume not in ("auto", "never") and not CHECKPOINT_NAME.match(resume.rstrip("/").rsplit("/", 1)[-1]):
            raise UserError(f"RESUME={resume!r}: use auto, never, or the name of a checkpoint such as checkpoint-40")
        if self.overwrite and resume not in ("auto", "never"):
            raise UserError(f"RESUME={resume} and OVERWRITE=True contradict each other (OVERWRITE removes that "
                            f"checkpoint); drop one of them")
        if self.max_steps and self.eval_steps > self.max_steps:
            raise UserError(f"EVAL_STEPS={self.eval_steps} is more than MAX_STEPS={self.max_steps}: no evaluation "
                            f"would pick a best checkpoint; set --EVAL_STEPS to at most {self.max_steps} (or 0 = "
                            f"once per epoch)")
        self.generation   # MIN_NEW_TOKENS > MAX_NEW_TOKENS is an error there
        self.check_objective()

    def check_objective(self) -> None:
        """OBJECTIVE and the settings that belong to it."""
        objective = self.objective
        if self.preference and not self.start_adapter:
            raise UserError(f"OBJECTIVE={objective} tunes a trained adapter, and START_ADAPTER is not set; train one "
                            f"with --objective=sft first, then pass its folder: --start_adapter=ft_outputs/<run>")
        if not self.preference and self.start_adapter:
            raise UserError(f"START_ADAPTER={self.start_adapter} is for OBJECTIVE=dpo or orpo (OBJECTIVE={objective} "
                            f"starts a new adapter); pass --objective=dpo, or drop --start_adapter")
        if not self.preference and self.preference_beta is not None:
            raise UserError(f"PREFERENCE_BETA is for OBJECTIVE=dpo or orpo, not {objective}; drop --preference_beta")
        if self.preference and not self.negatives:
            raise UserError("NEGATIVES is empty: preference tuning needs at least one corruption kind to make the "
                            "rejected summaries; pass e.g. --negatives=name,number,speaker,sentence")


def check_lengths(model_config, family: str, model_name: str, max_input: int, max_target: int) -> int | None:
    """Fail before loading weights when the requested lengths exceed the model's positions. A
    causal model holds prompt + summary in one context; a seq2seq model each in its own."""
    limit = arch.max_positions(model_config)
    if not limit:
        return None
    if family == arch.CAUSAL and max_input + max_target > limit:
        raise UserError(f"MAX_INPUT_LENGTH={max_input} + MAX_TARGET_LENGTH={max_target} = {max_input + max_target} "
                        f"tokens is more than {model_name} allows ({limit} positions); lower them to sum to <= {limit}")
    if family == arch.SEQ2SEQ:
        for name, value in (("MAX_INPUT_LENGTH", max_input), ("MAX_TARGET_LENGTH", max_target)):
            if value > limit:
                raise UserError(f"{name}={value} is more than {model_name} allows ({limit} tokens); "
                                f"set --{name}={limit} or less")
    return int(limit)
