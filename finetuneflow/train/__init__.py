"""The training feature behind train_bart_lora.py, one module per job:

* settings.py  TrainSettings (typed settings, built once by the script) and the checks that need no model
* encoding.py  rows -> token ids through the family's training rule, the tokenized-split cache, the collator
* lora.py      loading the base (QLoRA checks), LoRA targets from the shared architecture table, add_lora
* run_dir.py   the run folder: plan (start/resume/skip/replace/refuse), checkpoint markers, own-files-only removal
* trainer.py   SummarizationTrainer (generated-ROUGE evaluations, resumable data order, non-finite stop)
* outputs.py   train_metrics.json, loss_curve.png, the adapter folder
* preflight.py settings checks, output safety, data and the run plan, before any heavy import
* steps.py     the rest of a run, step by step, in the order that keeps the user's files safe
"""
