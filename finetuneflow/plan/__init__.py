"""Choosing a model and planning its fine-tune (benchmark_models.py, recommend_finetune.py), one job
per module:

* benchmark      - the benchmark run: MODELS entries, the rows every entry is scored on, the per-entry loop
* baselines      - lead-k and extractive reference summaries (no model)
* measuring      - one model's speed, peak memory and size (MeasureRequest, measure_model, run_isolated)
* model_facts    - architecture columns and Linear-layer sizes, shared by the benchmark and the planner
* scoring        - composite score, Pareto front, order and verdict
* ranking_report - final_ranking.csv/.json/.html, charts, console table
* hardware       - GPU specs, target machine
* shapes         - a model's size from its config or the ranking; the trainer's default LoRA targets
* memory         - training memory by part; the cheapest method that fits
* planning       - one plan per model: lengths, method, time estimate, trainer settings
* launch         - safe train_<model>.sh scripts
* plan_report    - finetune_plan.md
* recommend      - the recommend stage's inputs and outputs
* outputs        - output safety for the folder both stages share
"""
