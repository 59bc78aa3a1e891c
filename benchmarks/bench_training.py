"""Benchmark: the seed's training batches vs this trainer's (fp32 and bf16 autocast), same model,
same rows, same steps.

The seed tokenized in `datasets.map` with padding="max_length" (dialogues to 768 tokens, summaries
to 192; for a causal model: prompt + summary padded to 768 + 192) and left the label pads as the
pad id, so every sample costs the full length and the loss also trains on padding.
train_bart_lora.py tokenizes without padding, pads each batch to its longest row (labels -100)
and groups rows of similar length (group_by_length); on a CPU with native bf16 (avx512_bf16 or
AMX) it also trains under bf16 autocast (`--precision=auto|bf16`: LoRA weights, gradients and
AdamW stay fp32). The recipes: `seed_max_length` (fp32, as the seed ran on a CPU), `dynamic`
(fp32) and `dynamic_bf16` (skipped with a note where the CPU has no native bf16).

Both recipes train the same LoRA (r=8 on the architecture's default targets) for STEPS optimizer
steps of BATCH_SIZE x GRAD_ACCUM samples on the same STEPS x BATCH_SIZE x GRAD_ACCUM training rows
(one pass, so both see exactly the same samples). Each recipe runs in its own process, so its peak
RSS is its own. Tokens/s counts real (non-padding) tokens for both.

group_by_length sorts rows by length inside mega-batches of 50 optimizer batches (400 rows at the
seed's 4 x 2); transformers shrinks that multiplier on datasets under 4 mega-batches, which for a
pool of a few steps would leave it sorting single batches. The dynamic recipe here keeps the 50x
mega-batch, i.e. batches the few rows the way a full-size run batches each 400-row slice.
Timing: wall-clock samples/s, and samples per CPU-second of the process (steadier on a shared machine).

Reads:  MODEL_NAME (default: tiny BART and tiny Llama built on the fly), DATASET
Writes: stdout table; OUTPUT_JSON when set
Run as:
    python benchmarks/bench_training.py                               # tiny models, bundled samples
    python benchmarks/bench_training.py --model_name=ft_outputs/base_smollm2 \\
        --dataset=../shared/data/dialogsum_dev500.jsonl --steps=2
"""
MODEL_NAME = None                      # [str | None] model folder or Hub id; None: a tiny BART and a tiny Llama
DATASET = "data/samples/dialogues.jsonl"  # training rows come from its train split
STEPS = 3                              # [int >= 1] optimizer steps per recipe
BATCH_SIZE = 4                         # [int >= 1] micro-batch (the seed's)
GRAD_ACCUM = 2                         # [int >= 1] micro-batches per step (the seed's)
MAX_INPUT_LENGTH = 768                 # [int >= 16] the seed's input padding length
MAX_TARGET_LENGTH = 192                # [int >= 2] the seed's label padding length
SEED = 42                              # [int >= 0] row subset and data order
REPEATS = 1                            # [int >= 1] runs per recipe, interleaved; the fastest counts (noisy machines)
THREADS = 0                            # [int >= 0] torch CPU threads per recipe (0: torch's default; 1: steadier)
# [list[seed_max_length | dynamic | dynamic_bf16]] recipes to run
RECIPES = ["seed_max_length", "dynamic", "dynamic_bf16"]
OUTPUT_JSON = ""                     # also write the results here ("" = print only)

import multiprocessing
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from finetuneflow.train import encoding, lora, trainer  # noqa: E402
from finetuneflow.contract.settings import configure  # noqa: E402
from finetuneflow.contract.errors import run_cli  # noqa: E402
from finetuneflow.contract.io import atomic_write_json  # noqa: E402
from finetuneflow.contract.paths import resolve  # noqa: E402

BASELINE = "seed_max_length"


def seed_batches(rows, tokenizer, spec):
    """The seed's tokenization: pad everything to full length in map; label pads are NOT -100."""
    from finetuneflow.model.family import CAUSAL
    from finetuneflow.model.prompts import encode_causal_prompt

    if spec.family == CAUSAL:
        total = spec.max_input_length + spec.max_target_length

        def encode(batch):
            out = {"input_ids": [], "attention_mask": [], "labels": []}
            for dialogue, summary in zip(batch["dialogue"], batch["summary"]):
                prompt, _ = encode_causal_prompt(tokenizer, dialogue, spec.instruction, spec.max_input_length)
                target = tokenizer(summary, add_special_tokens=False)["input_ids"][:spec.max_target_length - 1]
                ids = (prompt + target + [tokenizer.eos_token_id])[:total]
                padded = ids + [tokenizer.pad_token_id] * (total - len(ids))
                out["input_ids"].append(padded)
                out["attention_mask"].append([1] * len(ids) + [0] * (total - len(ids)))
                out["labels"].append(list(padded))
            return out
    else:
        def encode(batch):
            inputs = tokenizer([spec.seq2seq_prefix + d for d in batch["dialogue"]], max_length=spec.max_input_length,
                               padding="max_length", truncation=True)
            labels = tokenizer(text_target=batch["summary"], max_length=spec.max_target_length,
                               padding="max_length", truncation=True)
            inputs["labels"] = labels["input_ids"]
            return inputs
    return rows.map(encode, batched=True, remove_columns=rows.column_names)


class FullScaleGrouping:
    """group_by_length's sampler with the mega-batch multiplier of a full-size dataset (50)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=50,
                                               generator=torch.Generator().manual_seed(self.seed)))


class GroupedTrainer(trainer.SummarizationTrainer):
    """This trainer with FullScaleGrouping as its train sampler."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return FullScaleGrouping([len(ids) for ids in dataset["input_ids"]],
                                 self.args.train_batch_size * self.args.gradient_accumulation_steps, self.args.seed)


def run_recipe(recipe: str, model_name: str, dataset: str, settings: dict) -> dict:
    """Train `settings["STEPS"]` steps with one recipe in this (fresh) process; return its numbers."""
    import time

    import datasets
    import transformers
    from transformers import PrinterCallback, TrainingArguments, default_data_collator, set_seed

    from finetuneflow.contract.data import load_dialogues, subset
    from finetuneflow.model.family import SEQ2SEQ
    from finetuneflow.model.loading import load_model
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION, seq2seq_prefix

    import torch
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    if settings.get("THREADS"):
        torch.set_num_threads(settings["THREADS"])
    bf16 = recipe.endswith("_bf16")
    set_seed(settings["SEED"])
    loaded = load_model(model_name, device="cpu", for_training=True)
    targets = lora.resolve_target_modules(loaded.model, None, loaded.family)
    model = lora.add_lora(loaded, targets, 8, 32, 0.05, False, False)
    data = load_dialogues(dataset, seed=settings["SEED"])
    n_rows = settings["STEPS"] * settings["BATCH_SIZE"] * settings["GRAD_ACCUM"]
    rows = subset(data.splits["train"], n_rows, settings["SEED"])
    spec = encoding.EncodingSpec(loaded.family, DEFAULT_INSTRUCTION,
                                 seq2seq_prefix(loaded.model.config) if loaded.family == SEQ2SEQ else "",
                                 settings["MAX_INPUT_LENGTH"], settings["MAX_TARGET_LENGTH"])
    start = time.perf_counter()
    if recipe.startswith("dynamic"):
        train_ds, _ = encoding.tokenize_split(rows, loaded.tokenizer, spec, None, "bench")
        collator, sampling = encoding.make_collator(loaded.tokenizer, loaded.device), "group_by_length"
    else:
        train_ds, collator, sampling = seed_batches(rows, loaded.tokenizer, spec), default_data_collator, "random"
    tokenize_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=settings["BATCH_SIZE"],
                                 gradient_accumulation_steps=settings["GRAD_ACCUM"], max_steps=settings["STEPS"],
                                 learning_rate=2e-4, save_strategy="no", eval_strategy="no", report_to="none",
                                 logging_steps=1, train_sampling_strategy=sampling, use_cpu=True, bf16=bf16,
                                 seed=settings["SEED"], disable_tqdm=True, label_names=["labels"])
        trainer_class = GroupedTrainer if recipe.startswith("dynamic") else trainer.SummarizationTrainer
        run = trainer_class(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                            processing_class=loaded.tokenizer)
        run.remove_callback(PrinterCallback)
        cpu_start = time.process_time()
        run.train()
        cpu_seconds = time.process_time() - cpu_start
    speed = run.throughput()
    losses = [h["loss"] for h in run.state.log_history if "loss" in h]
    return {"recipe": recipe, "model": model_name, "family": loaded.family, "rows": len(rows),
            "precision": "bf16 autocast" if bf16 else "fp32", "threads": torch.get_num_threads(),
            "steps": run.state.global_step, "samples": speed["samples"], "train_seconds": speed["train_seconds"],
            "samples_per_s": speed["samples_per_s"], "tokens_per_s": speed["tokens_per_s"],
            "cpu_seconds": round(cpu_seconds, 2), "samples_per_cpu_s": round(speed["samples"] / cpu_seconds, 4),
            "padded_tokens_per_s": speed["padded_tokens_per_s"], "tokenize_seconds": round(tokenize_seconds, 2),
            "peak_rss_mb": trainer.peak_rss_mb(), "first_loss": losses[0] if losses else None}


def in_fresh_process(*args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_recipe, args)


def cpu_has_native_bf16() -> bool:
    from finetuneflow.model.precision import cpu_bf16
    return cpu_bf16().native


def compare(runs: dict[str, dict]) -> dict:
    """Every recipe's speed and memory as ratios to the seed's recipe (same run, same rows)."""
    seed = runs.get(BASELINE)
    ratios = {}
    for recipe, r in runs.items():
        if seed is None or recipe == BASELINE:
            continue
        ratios[recipe] = {"samples_per_s": round(r["samples_per_s"] / seed["samples_per_s"], 2),
                          "tokens_per_s": round(r["tokens_per_s"] / seed["tokens_per_s"], 2),
                          "samples_per_cpu_s": round(r["samples_per_cpu_s"] / seed["samples_per_cpu_s"], 2),
                          "peak_rss": round(r["peak_rss_mb"] / seed["peak_rss_mb"], 2)}
    return ratios


def print_result(result: dict, cfg, settings: dict) -> None:
    runs = result["runs"]
    first = next(iter(runs.values()))
    print(f"\n{result['model']} ({first['family']}): {first['steps']} steps x "
          f"{cfg.BATCH_SIZE}x{cfg.GRAD_ACCUM} samples, "
          f"lengths {settings['MAX_INPUT_LENGTH']}/{settings['MAX_TARGET_LENGTH']}, {first['threads']} thread(s), "
          f"best of {max(1, cfg.REPEATS)}")
    print(f"  {'recipe':<16}{'samples/s':>10}{'tokens/s':>10}{'padded tok/s':>13}{'train s':>9}"
          f"{'samples/CPU-s':>14}{'peak RSS MB':>12}{'first loss':>11}")
    for recipe, r in runs.items():
        print(f"  {recipe:<16}{r['samples_per_s']:>10.3f}{r['tokens_per_s']:>10.1f}{r['padded_tokens_per_s']:>13.1f}"
              f"{r['train_seconds']:>9.1f}{r['samples_per_cpu_s']:>14.4f}{r['peak_rss_mb']:>12.1f}"
              f"{r['first_loss'] or float('nan'):>11.4f}")
    for recipe, ratio in result["vs_seed"].items():
        print(f"  {recipe} / seed: samples/s x{ratio['samples_per_s']}, tokens/s x{ratio['tokens_per_s']}, "
              f"samples/CPU-s x{ratio['samples_per_cpu_s']}, peak RSS x{ratio['peak_rss']}")


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    settings = {k: cfg[k] for k in ("STEPS", "BATCH_SIZE", "GRAD_ACCUM", "MAX_INPUT_LENGTH", "MAX_TARGET_LENGTH",
                                    "SEED", "THREADS")}
    dataset = str(resolve(cfg.DATASET))
    recipes = list(dict.fromkeys(cfg.RECIPES))
    if "dynamic_bf16" in recipes and not cpu_has_native_bf16():
        recipes.remove("dynamic_bf16")
        print("note: this CPU has no native bf16 (avx512_bf16 or AMX): the dynamic_bf16 recipe is skipped")
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.MODEL_NAME:
            models = [str(resolve(cfg.MODEL_NAME)) if resolve(cfg.MODEL_NAME).exists() else cfg.MODEL_NAME]
        else:
            from finetuneflow.model.tiny import build_tiny_bart, build_tiny_llama
            # the tiny models hold 512 positions: the seed lengths are scaled down to fit
            settings.update(MAX_INPUT_LENGTH=min(cfg.MAX_INPUT_LENGTH, 384),
                            MAX_TARGET_LENGTH=min(cfg.MAX_TARGET_LENGTH, 96))
            models = [str(build_tiny_bart(tmp)), str(build_tiny_llama(tmp))]
        results = []
        for model in models:
            found = {recipe: [] for recipe in recipes}
            for _ in range(max(1, cfg.REPEATS)):
                for recipe in recipes:
                    found[recipe].append(in_fresh_process(recipe, model, dataset, settings))
            runs = {recipe: max(done, key=lambda r: r["samples_per_s"]) for recipe, done in found.items()}
            results.append({"model": model, "settings": settings, "runs": runs, "vs_seed": compare(runs)})
    for result in results:
        print_result(result, cfg, settings)
    report = {"results": results}
    if cfg.OUTPUT_JSON:
        atomic_write_json(resolve(cfg.OUTPUT_JSON), report)
    return report


if __name__ == "__main__":
    run_cli(main)
