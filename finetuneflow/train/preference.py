"""OBJECTIVE=dpo|orpo: preference tuning of a finished adapter through TRL's trainers (the losses
are TRL's, not written here).

* Data: train/pairs.py makes the pairs (chosen = the reference, rejected = a corruption of it by
  quality/corruptions.py) for the training and the validation rows; train/encoding.py tokenizes
  them through the one prompt path (model/family.py `preference_example`, the same ids as sft
  training), so TRL never tokenizes dialogue text: `PreferenceDPOTrainer._prepare_dataset` takes
  the ids as they are, and `PreferenceORPOTrainer.tokenize_row` the ids in TRL's ORPO layout.
* Model: START_ADAPTER loaded trainable on its base (train/lora.py). DPO's reference is the SFT
  model itself: handed a PEFT model with a trained adapter and no ref_model, TRL's DPOTrainer
  copies the adapter into a frozen second adapter named "ref" and computes the reference
  log-probabilities with it (not with the adapters disabled, which would be the base model): at
  step 0 the policy equals the reference and the DPO loss is ln 2. Only the trained adapter
  ("default") is saved, so the run folder is again ONE adapter of MODEL. ORPO has no reference.
* Families: TRL's DPOTrainer trains decoder-only models only; its ORPOTrainer (trl.experimental)
  takes encoder-decoder ones too (model/family.py `preference_objectives`).
* Everything else as for sft (train/trainer_core.py): evaluations with generated ROUGE and the
  unsupported-mention rate, SELECT_ON, checkpoints, resume. The validation loss is the objective's
  loss on the validation pairs.
"""
from __future__ import annotations

import warnings

import datasets

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.record import fingerprint, portable
from finetuneflow.train import encoding, pairs
from finetuneflow.train.preflight import TrainJob
from finetuneflow.train.start_adapter import trained_fingerprints
from finetuneflow.train.trainer import training_argument_values
from finetuneflow.train.trainer_core import SummaryTrainerMixin

with warnings.catch_warnings():   # ORPO lives in trl.experimental, which warns on import
    warnings.simplefilter("ignore")
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer


REFERENCE_ADAPTER = "ref"   # the frozen copy of the start adapter TRL's DPOTrainer makes
# TRL asks transformers 5 by the old name on every step; the answer is the same
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def trl_version() -> str:
    import trl
    return trl.__version__


def pair_lengths(prompts: list, chosen: list, rejected: list) -> list[int]:
    """Tokens of each pair's longer sequence (the length-grouped order)."""
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]


class PreferenceDPOTrainer(SummaryTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer on pairs tokenized by train/encoding.py, with the stage's evaluations."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset   # prompt_ids / chosen_ids / rejected_ids already, through model/prompts.py

    def create_model_card(self, *args, **kwargs) -> None:
        return None      # no README.md in the run folder (the contract lists its files)

    def batch_counts(self, inputs: dict) -> tuple[int, int, int]:
        mask = inputs["attention_mask"]   # the chosen rows, then the rejected rows
        return int(mask.shape[0]) // 2, int(mask.sum()), int(mask.numel())

    def row_lengths(self, dataset) -> list[int]:
        return pair_lengths(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])


class PreferenceORPOTrainer(SummaryTrainerMixin, ORPOTrainer):
    """TRL's ORPOTrainer on pairs tokenized by train/encoding.py (in its layout, `orpo_rows`)."""

    def tokenize_row(self, feature, model=None) -> dict:
        return {key: feature[key] for key in feature if key.startswith(("prompt_", "chosen_", "rejected_"))}

    def create_model_card(self, *args, **kwargs) -> None:
        return None

    def batch_counts(self, inputs: dict) -> tuple[int, int, int]:
        samples = int(inputs["chosen_labels"].shape[0])
        masks = [inputs[k] for k in ("chosen_attention_mask", "rejected_attention_mask") if k in inputs]
        if not masks:   # encoder-decoder: the prompt is read twice, plus each summary
            prompt = inputs["prompt_attention_mask"]
            masks = [prompt, prompt, inputs["chosen_labels"] != -100, inputs["rejected_labels"] != -100]
        return samples, int(sum(m.sum() for m in masks)), int(sum(m.numel() for m in masks))

    def row_lengths(self, dataset) -> list[int]:
        if "chosen_input_ids" in dataset.column_names:
            return [max(len(c), len(r)) for c, r in zip(dataset["chosen_input_ids"], dataset["rejected_input_ids"])]
        return pair_lengths(dataset["prompt_input_ids"], dataset["chosen_labels"], dataset["rejected_labels"])


def orpo_rows(tokenized: datasets.Dataset, encoder_decoder: bool) -> datasets.Dataset:
    """Pairs (prompt_ids, chosen_ids, rejected_ids) in the layout TRL's ORPOTrainer reads: for a
    decoder-only model each summary after the prompt with labels on the summary only, for an
    encoder-decoder model the prompt as encoder input and each summary as labels (as TRL's own
    `tokenize_row` lays them out)."""
    def layout(row: dict) -> dict:
        p = row["prompt_ids"]
        out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
        for side in ("chosen", "rejected"):
            target = row[f"{side}_ids"]
            if encoder_decoder:
                out[f"{side}_labels"] = target
            else:
                out.update({f"{side}_input_ids": p + target, f"{side}_attention_mask": [1] * (len(p) + len(target)),
                            f"{side}_labels": [-100] * len(p) + target})
        return out

    return tokenized.map(layout, remove_columns=tokenized.column_names, desc="ORPO layout")


def tokenize(job: TrainJob, tokenizer, spec: encoding.EncodingSpec) -> dict:
    """The training and validation pairs as ids, their counts (job.pairs), and the validation rows'
    own encoding (the evaluation subset is drawn by its lengths, as for sft)."""
    s, out = job.settings, {}
    for name, rows in (("train", job.train_rows), ("validation", job.val_rows)):
        table, counts = pairs.pair_rows(rows, s.negatives, s.pairs_per_row, s.seed)
        if not len(table):
            raise UserError(f"none of the {len(rows)} {name} rows admits a corruption of the kinds NEGATIVES="
                            f"{','.join(s.negatives)} (no second row, name, number or speaker to change); add rows "
                            f"(TRAIN_SAMPLES / VAL_SAMPLES) or kinds")
        job.pairs[name] = counts
        out[name], out.setdefault("stats", {})[name] = encoding.tokenize_pairs(table, tokenizer, spec, job.cache,
                                                                               f"pairs-{name}")
    validation, _ = encoding.tokenize_split(job.val_rows, tokenizer, spec, job.cache, "validation")
    out["eval_lengths"] = [len(ids) for ids in validation["input_ids"]]
    seen = set(trained_fingerprints(job.start))
    overlap = sum(1 for dialogue in job.val_rows["dialogue"] if fingerprint(dialogue) in seen)
    if overlap:
        job.say(f"note: {overlap} of the {len(job.val_rows)} validation rows are rows {job.start.path.name} was "
                f"trained on, so in-training scores are optimistic; give this run the sft run's data settings "
                f"(DATASET, SPLIT_SEED or SEED, VAL_FRACTION, TEST_FRACTION, TRAIN_SAMPLES, VAL_SAMPLES)")
    return out


def build_trainer(job: TrainJob, model, tokenizer, tokenized: dict, report_to, callbacks: list):
    """TRL's trainer for OBJECTIVE (dpo or orpo) with the stage's Trainer settings, evaluations and
    callbacks; PREFERENCE_BETA None keeps TRL's beta."""
    s = job.settings
    values = training_argument_values(s, job.plan, job.state.device, report_to, job.precision)
    values.update(run_name=job.out.name, label_names=[])
    if s.preference_beta is not None:
        values["beta"] = float(s.preference_beta)
    common = dict(model=model, processing_class=tokenizer, callbacks=callbacks, generation_eval=job.eval_spec,
                  select_on=job.select_on, faithfulness_margin=s.faithfulness_margin, eval_precision=s.eval_precision)
    if s.objective == "dpo":
        args = DPOConfig(**values, max_length=None, precompute_ref_log_probs=False)
        trainer = PreferenceDPOTrainer(args=args, train_dataset=tokenized["train"],
                                       eval_dataset=tokenized["validation"], **common)
        if REFERENCE_ADAPTER not in trainer.model.peft_config:   # an older TRL would compare with the bare base
            raise UserError(f"this TRL ({trl_version()}) computes DPO's reference without the start adapter (the base "
                            f"model, not the SFT model); install trl>=1.16 (requirements.txt)")
        return trainer
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    args = ORPOConfig(**values, max_length=s.max_input_length + s.max_target_length,
                      max_completion_length=s.max_target_length)
    return PreferenceORPOTrainer(args=args, train_dataset=orpo_rows(tokenized["train"], encoder_decoder),
                                 eval_dataset=orpo_rows(tokenized["validation"], encoder_decoder), **common)


def record_facts(job: TrainJob, beta: float) -> dict:
    """What the run record and train_metrics.json say about the preference run."""
    s = job.settings
    return {"objective": s.objective, "start_adapter": portable(job.start.path) if job.start else None,
            "start_base": job.start.base if job.start else None, "beta": beta, "negatives": list(s.negatives),
            "pairs": job.pairs, "inherited_settings": job.inherited,
            "reference": "the start adapter (a frozen copy)" if s.objective == "dpo" else None}
