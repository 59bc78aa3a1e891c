"""OBJECTIVE=dpo|orpo continues a finished adapter (START_ADAPTER): what is checked before anything
heavy loads (no torch here), and what the run takes over from the adapter's run record.

* START_ADAPTER must be the OUTPUT_DIR of a finished train_bart_lora.py run (adapter_config.json,
  the adapter weights and its run_config.json), trained on MODEL itself: preference tuning goes on
  training that adapter on its own base, so the result is again ONE adapter of MODEL that the
  evaluation, merge and export stages read like any other.
* The objective must be one TRL can train for the family (`Family.preference_objectives`).
* INSTRUCTION and the decoding settings left at None are taken from the adapter's record, so the
  prompt is the one the adapter learned and in-training evaluations decode as its own did.
* The rows the start adapter was trained on stay training rows of the result (`trained_fingerprints`
  joins the run record's), so the evaluation stage keeps refusing them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetuneflow.contract.data import legacy_train_fingerprints
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord, portable, read_record
from finetuneflow.contract.settings import Config
from finetuneflow.model.family import family_of
from finetuneflow.model.loading import adapter_base, is_adapter_dir, local_or_hub
from finetuneflow.train.settings import STAGE, TrainSettings

ADAPTER_WEIGHTS = "adapter_model.safetensors"
INHERITED = ("INSTRUCTION", *GenerationSettings.names())


@dataclass(frozen=True)
class StartAdapter:
    """A finished adapter a preference run continues."""
    path: Path
    record: RunRecord
    base: str            # its base model, as its record names it

    @property
    def weights(self) -> Path:
        return self.path / ADAPTER_WEIGHTS


def same_model(a: str, b: str) -> bool:
    """Whether two MODEL values name the same model (the same folder, however written, or Hub id)."""
    first, second = local_or_hub(a), local_or_hub(b)
    if Path(first).exists() and Path(second).exists():
        return Path(first).resolve() == Path(second).resolve()
    return first == second


def check_start_adapter(settings: TrainSettings) -> StartAdapter | None:
    """The adapter a dpo/orpo run continues, checked (None for sft)."""
    if not settings.preference:
        return None
    given = settings.start_adapter
    path = resolve(given)
    fix = "pass the OUTPUT_DIR of a finished train_bart_lora.py run"
    if not path.is_dir():
        raise UserError(f"START_ADAPTER {given}: {path} is not a folder; {fix}")
    if not is_adapter_dir(path) or not (path / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"START_ADAPTER {path} is not an adapter folder (no adapter_config.json and "
                        f"{ADAPTER_WEIGHTS}); {fix}")
    record = read_record(path)
    if record is None or record.stage != STAGE:
        raise UserError(f"START_ADAPTER {path} holds no finished train_bart_lora.py run (its run_config.json is "
                        f"missing or from {record.stage if record else 'nowhere'}); {fix}")
    base = adapter_base(path, record)
    if not same_model(base, settings.model):
        raise UserError(f"START_ADAPTER {portable(path)} was trained on {base}, not on MODEL {settings.model}; pass "
                        f"--model={base} (preference tuning continues the adapter on its own base)")
    family = family_of(record.family) if record.family else None
    if family is not None and settings.objective not in family.preference_objectives:
        raise UserError(f"OBJECTIVE={settings.objective} cannot train the {family} model {base}: "
                        f"{family.preference_note}; use --objective={' or '.join(family.preference_objectives)}")
    return StartAdapter(path, record, base)


def with_inherited(settings: TrainSettings, start: StartAdapter | None) -> tuple[TrainSettings, list[str]]:
    """The settings with what is still None taken from the start adapter's record (a new object:
    the script's settings are not edited), and the names it filled."""
    if start is None:
        return settings, []
    config = Config(settings.recorded)
    config.meta.update(getattr(settings.recorded, "meta", {}) or {})
    filled = start.record.inherit_into(config, INHERITED)
    if not filled:
        return settings, []
    return TrainSettings.from_config(config), filled


def trained_fingerprints(start: StartAdapter | None) -> list[str]:
    """Fingerprints of the dialogues the start adapter was trained on (none without a start adapter)."""
    split = start.record.split if start is not None else None
    if split is None:
        return []
    return list(split.train_fingerprints or legacy_train_fingerprints(split))
