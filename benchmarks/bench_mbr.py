"""Benchmark: greedy decoding vs consensus (MBR) decoding, wall-clock per row, side by side.

Both run through the engine (finetuneflow/engine/generation.py) on the same model, rows and
limits in one process. MBR is DECODING=mbr: the greedy summary plus MBR_SAMPLES seeded samples per
row (the prompt encoded once per row, its KV cache or encoder output shared by the samples), then
the choice (quality/mbr.py: faithfulness filter, MBR_UTILITY agreement). To keep a busy machine's
load from favouring one side, the rows are cut into the engine's batches (longest first) and each
batch is run greedily and with MBR in turn (rotating which goes first); the times add up per side.

Printed and written (OUTPUT_JSON), per model: seconds per row for greedy and for MBR, the ratio
(the issue's goal: <= 3x greedy on a 2-core CPU), MBR's own split (its greedy part, the samples,
the choice), generated tokens per row, how often MBR kept the greedy summary, the candidates the
faithfulness filter dropped, and the machine (CPU, cores, torch threads, versions).

Reads:  MODELS (model or adapter folders, a .gguf, a CTranslate2 folder, or "tiny" = the tiny Llama
        built on the fly), DATASET (rows: id, dialogue, summary)
Writes: OUTPUT_JSON (optional) with every number printed
Run as:
    python benchmarks/bench_mbr.py                                         # tiny Llama, bundled samples
    python benchmarks/bench_mbr.py --models=ft_outputs/base_smollm2 --dataset=../shared/data/dialogsum_dev500.jsonl \\
        --split=test --n_samples=16 --threads=2 --output_json=benchmarks/results/mbr_smollm2.json
"""
MODELS = ["tiny"]                      # model folders / adapters / .gguf / CT2 folders; "tiny" = tiny Llama
DATASET = "data/samples/dialogues.jsonl"  # local file or Hub id (rows: id, dialogue, summary)
SPLIT = "train"                        # split to take the rows from (train: every row of a single file)
VAL_FRACTION = 0.0                     # [0 <= float < 1] split a single file as training did (RESULTS.md: 0.1)
TEST_FRACTION = 0.0                    # [0 <= float < 1] ... (RESULTS.md: 0.2, --split=test = the held-out rows)
SEED = 42                              # [int >= 0] the split's seed
N_SAMPLES = 16                         # [int >= 1] rows summarized by each side
BATCH_SIZE = 8                         # [int >= 1] the engine's batch size (both sides)
MAX_NEW_TOKENS = 64                    # [int >= 1] summary token limit (both sides)
MAX_INPUT_LENGTH = 384                 # [int >= 16] input tokens (the recipe's)
NO_REPEAT_NGRAM_SIZE = 3               # [int >= 0] the recipe's (within the generated summary only)
MBR_SAMPLES = 8                        # [int >= 1] samples besides the greedy summary
MBR_TEMPERATURE = 0.7                  # [float > 0] sampling temperature
MBR_TOP_P = 0.95                       # [0 < float <= 1] nucleus sampling
MBR_UTILITY = "rougeL"                 # [rougeL | chrf | minilm] agreement between candidates
MBR_FAITHFUL = True                    # drop candidates with unsupported mentions first
THREADS = 0                            # [int >= 0] torch CPU threads (0 = torch's default: one per core)
OUTPUT_JSON = ""                       # also write the results here ("" = print only)

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetuneflow.contract.errors import run_cli  # noqa: E402
from finetuneflow.contract.settings import configure  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def machine(threads: int) -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": threads or torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}


def rows_of(cfg) -> list[dict]:
    from finetuneflow.contract.data import get_split, load_dialogues
    dataset = cfg.DATASET if Path(cfg.DATASET).is_absolute() or not (REPO / cfg.DATASET).exists() \
        else str(REPO / cfg.DATASET)
    data = load_dialogues(dataset, seed=cfg.SEED, val_fraction=cfg.VAL_FRACTION, test_fraction=cfg.TEST_FRACTION)
    split = get_split(data, cfg.SPLIT)
    return [split[i] for i in range(min(cfg.N_SAMPLES, len(split)))]


def batches(loaded, dialogues: list[str], cfg) -> list[list[int]]:
    """The engine's batches: longest first, BATCH_SIZE rows each."""
    from finetuneflow.engine.generation import input_lengths
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    lengths = input_lengths(loaded, dialogues, DEFAULT_INSTRUCTION, cfg.MAX_INPUT_LENGTH)
    order = sorted(range(len(dialogues)), key=lambda i: -lengths[i])
    return [order[i:i + cfg.BATCH_SIZE] for i in range(0, len(order), cfg.BATCH_SIZE)]


def settings(cfg, mbr: bool):
    from finetuneflow.contract.decoding import GenerationSettings
    common = {"max_new_tokens": cfg.MAX_NEW_TOKENS, "no_repeat_ngram_size": cfg.NO_REPEAT_NGRAM_SIZE}
    if not mbr:
        return GenerationSettings(decoding="greedy", **common)
    return GenerationSettings(decoding="mbr", mbr_samples=cfg.MBR_SAMPLES, mbr_temperature=cfg.MBR_TEMPERATURE,
                              mbr_top_p=cfg.MBR_TOP_P, mbr_utility=cfg.MBR_UTILITY, mbr_faithful=cfg.MBR_FAITHFUL,
                              **common)


def side_by_side(loaded, dialogues: list[str], cfg) -> dict:
    """Each batch greedily and with MBR in turn; seconds, tokens, choices added up per side."""
    from finetuneflow.engine.generation import summarize
    from finetuneflow.quality.mbr import choose_rows
    sides = {"greedy": settings(cfg, False), "mbr": settings(cfg, True)}
    for name in ("greedy", "mbr"):           # warm-up: kernels, the prefix cache, the choice's imports
        summarize(loaded, dialogues[:2], sides[name], cfg.BATCH_SIZE, cfg.MAX_INPUT_LENGTH, progress=False,
                  chooser=choose_rows)
    seconds, tokens, totals, summaries = {"greedy": 0.0, "mbr": 0.0}, {"greedy": 0, "mbr": 0}, {}, {}
    choices = []
    for number, rows in enumerate(batches(loaded, dialogues, cfg)):
        texts = [dialogues[i] for i in rows]
        for name in (("greedy", "mbr") if number % 2 == 0 else ("mbr", "greedy")):
            start = time.perf_counter()
            result = summarize(loaded, texts, sides[name], cfg.BATCH_SIZE, cfg.MAX_INPUT_LENGTH, progress=False,
                               chooser=choose_rows)
            seconds[name] += time.perf_counter() - start
            tokens[name] += result.generated_tokens
            summaries.update({(name, i): s for i, s in zip(rows, result.summaries)})
            if name == "mbr":
                for key, value in result.mbr_totals.items():
                    totals[key] = totals.get(key, 0) + value
                choices += [r["choice"] for r in result.mbr_rows]
    n = len(dialogues)
    return {"rows": n, "greedy_seconds_per_row": seconds["greedy"] / n, "mbr_seconds_per_row": seconds["mbr"] / n,
            "mbr_vs_greedy": seconds["mbr"] / seconds["greedy"] if seconds["greedy"] else None,
            "mbr_greedy_part_seconds_per_row": totals["greedy_seconds"] / n,
            "mbr_samples_seconds_per_row": totals["sample_seconds"] / n,
            "mbr_choice_seconds_per_row": totals["selection_seconds"] / n,
            "greedy_tokens_per_row": tokens["greedy"] / n,
            "mbr_candidate_tokens_per_row": totals["candidate_tokens"] / n,
            "mbr_kept_greedy": sum(c == 0 for c in choices), "mbr_dropped_unfaithful": totals["dropped"],
            "mbr_rows_all_flagged": totals["all_flagged"],
            "identical_summaries": sum(summaries[("greedy", i)] == summaries[("mbr", i)] for i in range(n))}


def tiny_llama(folder: Path) -> str:
    from finetuneflow.model.tiny import build_tiny_llama
    return str(build_tiny_llama(folder))


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    import torch
    from finetuneflow.model.loading import load_model
    if cfg.THREADS:
        torch.set_num_threads(cfg.THREADS)
    rows = rows_of(cfg)
    dialogues = [r["dialogue"] for r in rows]
    out = {"machine": machine(cfg.THREADS), "settings": {k: cfg[k] for k in cfg if k not in ("OUTPUT_JSON",)},
           "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in cfg.MODELS:
            path = tiny_llama(Path(tmp)) if name == "tiny" else name
            loaded = load_model(path, device="cpu")
            result = side_by_side(loaded, dialogues, cfg)
            result.update({"backend": loaded.backend.name, "dtype": loaded.dtype})
            out["models"][name] = result
            print(f"{name} ({loaded.backend.name}, {loaded.dtype}; {result['rows']} rows, batch {cfg.BATCH_SIZE}): "
                  f"greedy {result['greedy_seconds_per_row']:.3f} s/row, MBR({cfg.MBR_SAMPLES}) "
                  f"{result['mbr_seconds_per_row']:.3f} s/row = {result['mbr_vs_greedy']:.2f}x greedy "
                  f"(its greedy part {result['mbr_greedy_part_seconds_per_row']:.3f}, samples "
                  f"{result['mbr_samples_seconds_per_row']:.3f}, choice {result['mbr_choice_seconds_per_row']:.3f}); "
                  f"tokens/row {result['greedy_tokens_per_row']:.0f} vs {result['mbr_candidate_tokens_per_row']:.0f}; "
                  f"kept greedy on {result['mbr_kept_greedy']}, dropped {result['mbr_dropped_unfaithful']} unfaithful")
    print(f"machine: {out['machine']}")
    if cfg.OUTPUT_JSON:
        from finetuneflow.contract.io import atomic_write_json
        from finetuneflow.contract.paths import resolve
        atomic_write_json(resolve(cfg.OUTPUT_JSON), out)
        print(f"wrote {cfg.OUTPUT_JSON}")
    return out


if __name__ == "__main__":
    run_cli(main)
