"""Stage 4 - turn the benchmark ranking and a GPU into a fine-tuning plan and a ready-to-run command.

Reads:  RANKING (benchmark_models.py's final_ranking.csv), OVERVIEW (inspect_dataset.py's
        dataset_overview.json, optional: p99 token lengths), each model's config (local folder or Hub)
Writes: OUTPUT_DIR/recommendations.json        per model: size, memory estimates, method, hyperparameters, time
        OUTPUT_DIR/finetune_plan.md            the same for humans, with the reasoning
        OUTPUT_DIR/train_<model>.sh            `<this python> -m accelerate.commands.launch train_bart_lora.py ...`
        OUTPUT_DIR/recommend_finetune.run_config.json

Run as:
    python recommend_finetune.py                                  # plan for this machine's GPU (or CPU)
    python recommend_finetune.py --gpu_name=T4 --gpu_memory_gb=16 # plan for a Colab T4
    bash outputs/benchmarks/train_bart-large-cnn.sh               # then train (extra --NAME=value pass through)
Model size is the real parameter count from the model's config (built on the meta device, no
download of weights); when the config cannot be loaded (offline, gated) the ranking's columns are
used. The memory formula and the method choice are documented in finetuneflow/plan/memory.py, the
time scaling in finetuneflow/plan/planning.py; times are estimates (expect within ~2x). The launch
scripts quote every value and pass only settings the trainer declares, checked against its specs
(finetuneflow/plan/launch.py). They pass the dataset with the settings inspect_dataset.py (else
benchmark_models.py) read that dataset with: its columns, split fractions, seed, Hub config and
normalization, so training reads the same columns and makes the same split. OUTPUT_DIR is shared
with benchmark_models.py: this stage replaces only the files its own record lists, and removes its
earlier scripts only when they are unchanged.
"""
RANKING = "outputs/benchmarks/final_ranking.csv"  # benchmark_models.py's ranking
TOP_K = 2                              # [int >= 1] plan the best K successful models
GPU_NAME = ""                          # plan for this GPU: T4, L4, A10, A100, A100-80GB, H100, H200; "": this machine
GPU_MEMORY_GB = None                   # [float > 0 | None] memory to plan with, GB; None: detected free, or nominal
MEMORY_MARGIN = 0.8                    # [0 < float <= 1] share of the memory a plan may fill (rest: fragmentation)
OVERVIEW = "metrics/dataset_overview.json"  # inspect_dataset.py output: p99 token lengths ("" = ignore)
DATASET = None                         # [str | None] training data for the script; None: the overview's or benchmark's
TRAIN_SAMPLES = 2000                   # [int >= 0] training rows (the seed's 2,000)
VAL_SAMPLES = 200                      # [int >= 0] validation rows evaluated each epoch
EPOCHS = 3                             # [float > 0] passes over the training rows
MICRO_BATCH = 4                        # [int >= 1] planned micro-batch; halved when nothing fits
EFFECTIVE_BATCH = 8                    # [int >= 1] micro-batch x gradient accumulation (the seed's 4 x 2)
MAX_INPUT_LENGTH = 768                 # [int >= 16] tokens when there is no overview (the seed's)
MAX_TARGET_LENGTH = 192                # [int >= 2] tokens when there is no overview (the seed's)
MAX_INPUT_CAP = 1024                   # [int >= 16] longest input the plan allows, whatever the p99
MAX_TARGET_CAP = 256                   # [int >= 2] longest summary the plan allows
TRAINER = "train_bart_lora.py"         # the stage the launch scripts run
OUTPUT_DIR = "outputs/benchmarks"      # where the plan and scripts go (shared with benchmark_models.py)

from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.paths import require
from finetuneflow.contract.settings import configure
from finetuneflow.plan import launch, planning, recommend
from finetuneflow.plan.hardware import one_line, resolve_target
from finetuneflow.plan.memory import METHOD_NAMES


def describe(plan: dict) -> str:
    """One console line per plan."""
    name = one_line(plan["model"])
    if "error" in plan:
        return f"  {name}: not planned: {plan['error']}"
    if not plan["fits"]:
        return f"  {name}: {plan['needs']}"
    timing = plan["time"]
    return (f"  {name}: {plan['parameters'] / 1e6:,.1f}M parameters -> {METHOD_NAMES[plan['method']]}"
            f"{' + checkpointing' if plan['gradient_checkpointing'] else ''}, micro-batch {plan['micro_batch']} x "
            f"{plan['grad_accum']}, ~{plan['memory'][plan['method']]['total']} GB; "
            + (f"~{timing['minutes_per_epoch']} min/epoch (estimate)" if timing["available"] else "no time estimate")
            + f"; {plan['script'].rsplit('/', 1)[-1]}")


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    settings = planning.PlanSettings.from_config(cfg)
    ranking = require(cfg.RANKING, produced_by="benchmark_models.py", what="ranking")
    candidates, skipped = planning.select_candidates(planning.read_ranking(ranking), settings.top_k, ranking)
    overview_path, overview, overview_note = recommend.load_overview(cfg.OVERVIEW, OVERVIEW)
    trainer = launch.read_trainer(settings.trainer)
    folder = recommend.open_output(cfg.OUTPUT_DIR, ranking, overview_path, trainer, candidates)
    target = resolve_target(settings.gpu_name, settings.gpu_memory_gb)
    dataset = recommend.pick_dataset(settings, overview, ranking)
    data, data_from = recommend.data_settings(dataset, overview, ranking)   # columns, fractions, seed
    train_rows, val_rows = planning.rows_to_use(settings, overview, dataset)
    ctx = planning.PlanContext(settings, target, overview, dataset, train_rows, val_rows, trainer, data)
    print(f"planning for {target.name} ({target.memory_gb:.1f} GB, {target.source}); budget "
          f"{settings.memory_margin:.0%} = {settings.memory_margin * target.memory_gb:.1f} GB; data "
          f"{one_line(dataset)} ({'all' if train_rows is None else train_rows} training / {val_rows or 'all'} "
          f"validation rows); {overview_note}")
    print(f"data settings from {data_from}: " + (one_line(" ".join(f"{k}={v}" for k, v in data.items())) or "none"))
    if skipped:
        print("ranking rows not planned: " + ", ".join(f"{n} {what}" for what, n in skipped.items()))
    plans, scripts = planning.make_plans(candidates, ctx, folder.path)
    for plan in plans:
        print(describe(plan))
    meta = {"ranking": str(ranking), "overview": str(overview_path) if overview_path else None, "dataset": dataset,
            "data_settings": data, "margin": settings.memory_margin, "output_dir": str(folder.path)}
    inputs = [ranking, overview_path, trainer.path]
    result = recommend.write_outputs(folder, plans, scripts, ctx, meta, cfg, inputs)
    if result["removed"] or result["kept"]:
        print(f"removed {len(result['removed'])} earlier launch script(s) this plan does not write again"
              + (f"; kept {', '.join(result['kept'])} (edited since)" if result["kept"] else ""))
    print(f"wrote {folder.path / 'recommendations.json'}, finetune_plan.md and {len(scripts)} launch script(s) in "
          f"{folder.path}")
    return result


if __name__ == "__main__":
    run_cli(main)
