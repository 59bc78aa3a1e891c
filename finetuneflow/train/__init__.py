"""The training feature behind train_bart_lora.py, one module per job:

* settings.py      TrainSettings (typed settings, built once by the script) and the checks that need no model
* start_adapter.py OBJECTIVE=dpo|orpo: the adapter a run continues (checked before any heavy import), what it inherits
* encoding.py      rows (and preference pairs) -> token ids through the family's rule, the tokenized cache, the collator
* pairs.py         preference pairs: the reference vs corruptions by quality/corruptions.py, counted per kind
* lora.py          loading the base (QLoRA checks), LoRA targets from the shared architecture table, add_lora,
                   the start adapter
* run_dir.py       the run folder: plan (start/resume/skip/replace/refuse), checkpoint markers, own-files-only removal
* trainer_core.py  what every trainer adds (generated-ROUGE evaluations, selection, counts, resumable order,
                   non-finite stop)
* trainer.py       SummarizationTrainer (OBJECTIVE=sft) and the Trainer settings every objective shares
* preference.py    OBJECTIVE=dpo|orpo through TRL's DPOTrainer / ORPOTrainer
* outputs.py       train_metrics.json, loss_curve.png, the adapter folder
* preflight.py     settings checks, output safety, data and the run plan, before any heavy import
* steps.py         the rest of a run, step by step, in the order that keeps the user's files safe
"""
