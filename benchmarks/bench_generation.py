"""Benchmark: the seed's evaluation loop vs FineTuneFlow's generation engine, side by side, plus
the engine's exact speed-ups, bf16 on a CPU and sharded evaluation.

The seed's eval_bart_lora.py summarizes one dialogue at a time: tokenize with truncation,
`generate`, decode. The engine (finetuneflow/engine/generation.py) sorts inputs by length and
generates BATCH_SIZE at a time; the transformers backend adds exact speed-ups (the prompt prefix's
KV cache shared by a batch; prompt-lookup drafts for a single greedy row). Every method runs on the
same model, rows and greedy settings in one process. To keep a busy machine's load from favouring
one method, the rows are cut into the engine's batches (longest first) and each batch is run by
every method in turn (rotating which goes first); the times add up per method.

Rows printed:
  1. seed loop vs engine (plain generate, batched) vs engine + exact speed-ups; predictions compared
  2. one row at a time (a server's single request): plain generate vs prompt lookup
  3. bf16 vs fp32 (the engine with its speed-ups), where the CPU has bf16 instructions
  4. QUALITY_ROWS > 0: bf16 vs fp32 on held-out rows: identical summaries, ROUGE-L and the paired
     bootstrap interval of the difference
  5. SHARDED > 1: eval_bart_lora.py in one process vs `accelerate launch --multi_gpu --num_processes
     SHARDED` (wall clock of the whole command and generation time; the CSVs compared byte for byte)

Reads:  MODELS (model folders or Hub ids; "tiny" = the tiny BART and tiny Llama built on the fly), DATASET
Writes: OUTPUT_JSON (optional) with every number printed; SHARDED runs write into a temp folder
Run as:
    python benchmarks/bench_generation.py                                   # tiny models, bundled samples
    python benchmarks/bench_generation.py --models=ft_outputs/base_smollm2 \\
        --dataset=../shared/data/dialogsum_dev500.jsonl --n_samples=24 --threads=2 --quality_rows=100 --sharded=2
"""
MODELS = ["tiny"]                      # model folders / Hub ids; "tiny" = tiny BART + tiny Llama (built on the fly)
DATASET = "data/samples/dialogues.jsonl"  # local file or Hub id (rows: id, dialogue, summary)
SPLIT = "train"                        # split to take the rows from (a single local file is all "train")
N_SAMPLES = 24                         # [int >= 1] dialogues summarized by each method
BATCH_SIZE = 8                         # [int >= 1] the engine's batch size
NUM_BEAMS = 1                          # [int >= 1] 1 = greedy; the same for every method
MAX_NEW_TOKENS = 64                    # [int >= 1] summary token limit, the same for every method
MAX_INPUT_LENGTH = 768                 # [int >= 16] input tokens (the seed truncated at 768)
THREADS = 0                            # [int >= 0] torch CPU threads (0 = torch's default: one per core)
SINGLE_ROWS = 8                        # [int >= 0] rows for the one-row-at-a-time comparison (0 = skip)
BF16 = True                            # also time bf16 (skipped, with the reason, on a CPU without bf16)
QUALITY_ROWS = 0                       # [int >= 0] held-out rows for bf16 vs fp32 quality (0 = skip; 100 in the docs)
SHARDED = 0                            # [int >= 0] processes for the sharded-evaluation comparison (0/1 = skip)
SHARDED_ROWS = 48                      # [int >= 1] rows each evaluation run scores in the sharded comparison
OUTPUT_JSON = ""                       # also write the results here ("" = print only)

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetuneflow.contract.errors import run_cli  # noqa: E402
from finetuneflow.contract.settings import configure  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# The protocol of RESULTS.md: the 100 DialogSum rows the LoRA run held out, its prompt and decoding.
HELD_OUT = {"val_fraction": 0.2, "test_fraction": 0.0, "seed": 42, "split": "validation"}
HELD_OUT_DECODING = {"max_input_length": 384, "max_new_tokens": 64, "no_repeat_ngram_size": 3}


def seed_loop(loaded, dialogues, effective, instruction, max_input_length) -> tuple[list[str], int, float]:
    """The seed's way: one dialogue per generate() call, no sorting, no padding, no speed-ups."""
    import torch
    from finetuneflow.engine.generation import encode
    from finetuneflow.model.backends import finish
    from finetuneflow.model.backends.hf import generation_config_for
    from finetuneflow.model.prompts import stop_token_ids
    summaries, generated = [], 0
    stops = set(stop_token_ids(loaded.tokenizer)) | {loaded.tokenizer.pad_token_id}
    start = time.perf_counter()
    with generation_config_for(loaded, effective):
        for dialogue in dialogues:
            ids, _ = encode(loaded, dialogue, instruction, max_input_length)
            input_ids = torch.tensor([ids], device=loaded.device)
            with torch.inference_mode():
                out = loaded.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
            new = loaded.family.new_tokens(out, input_ids.shape[1])
            generated += finish(new.tolist(), stops, effective.max_new_tokens)[0].counted
            summaries.append(loaded.tokenizer.decode(new[0], skip_special_tokens=True).strip())
    return summaries, generated, time.perf_counter() - start


class Clock:
    """Seconds, generated tokens and summaries per method, added up batch by batch."""

    def __init__(self, names):
        self.seconds = dict.fromkeys(names, 0.0)
        self.tokens = dict.fromkeys(names, 0)
        self.summaries = {name: {} for name in names}

    def add(self, name, indices, summaries, tokens, seconds):
        self.seconds[name] += seconds
        self.tokens[name] += tokens
        self.summaries[name].update(zip(indices, summaries))

    def row(self, name, n) -> dict:
        seconds = self.seconds[name]
        return {"seconds": round(seconds, 2), "samples_per_s": round(n / seconds, 4),
                "tokens_per_s": round(self.tokens[name] / seconds, 2), "generated_tokens": self.tokens[name]}

    def differing(self, name, reference) -> int:
        return sum(self.summaries[name][i] != self.summaries[reference][i] for i in self.summaries[reference])


def run_rounds(methods: dict, groups: list[list[int]], dialogues: list[str]) -> Clock:
    """Every method on every group, rotating the order per group (a busy machine's load then
    falls on all of them alike)."""
    clock = Clock(list(methods))
    names = list(methods)
    for number, group in enumerate(groups):
        for name in names[number % len(names):] + names[:number % len(names)]:
            summaries, tokens, seconds = methods[name]([dialogues[i] for i in group])
            clock.add(name, group, summaries, tokens, seconds)
    return clock


def engine(loaded, settings, batch_size, max_input_length, speedups=True):
    from finetuneflow.engine.generation import summarize
    from finetuneflow.model.backends.hf import exact_speedups

    def run(texts):
        with exact_speedups(speedups):
            result = summarize(loaded, texts, settings, batch_size, max_input_length, progress=False)
        return result.summaries, result.generated_tokens, result.seconds
    return run


def length_groups(loaded, dialogues, size, max_input_length) -> list[list[int]]:
    """The engine's batches: rows sorted by input tokens (longest first), `size` at a time."""
    from finetuneflow.engine.generation import input_lengths
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    lengths = input_lengths(loaded, dialogues, DEFAULT_INSTRUCTION, max_input_length)
    order = sorted(range(len(dialogues)), key=lambda i: -lengths[i])
    return [order[i:i + size] for i in range(0, len(order), size)]


def bench_batched(loaded, bf16, dialogues, cfg) -> dict:
    """Row 1 (and 3): seed loop vs engine plain vs engine + speed-ups (vs the same in bf16)."""
    from finetuneflow.engine.generation import GenerationSettings, effective_settings
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    settings = GenerationSettings(num_beams=cfg.NUM_BEAMS, max_new_tokens=cfg.MAX_NEW_TOKENS)
    effective = effective_settings(loaded, settings)
    methods = {
        "seed_loop": lambda texts: seed_loop(loaded, texts, effective, DEFAULT_INSTRUCTION, cfg.MAX_INPUT_LENGTH),
        "engine_plain": engine(loaded, settings, cfg.BATCH_SIZE, cfg.MAX_INPUT_LENGTH, speedups=False),
        "engine": engine(loaded, settings, cfg.BATCH_SIZE, cfg.MAX_INPUT_LENGTH)}
    if bf16 is not None:
        methods["engine_bf16"] = engine(bf16, settings, cfg.BATCH_SIZE, cfg.MAX_INPUT_LENGTH)
    clock = run_rounds(methods, length_groups(loaded, dialogues, cfg.BATCH_SIZE, cfg.MAX_INPUT_LENGTH), dialogues)
    n, seed = len(dialogues), clock.seconds["seed_loop"]
    out = {name: {**clock.row(name, n), "speedup_vs_seed": round(seed / clock.seconds[name], 2),
                  "differing_from_seed": clock.differing(name, "seed_loop")} for name in methods}
    if bf16 is not None:
        out["engine_bf16"]["speedup_vs_fp32_engine"] = round(clock.seconds["engine"] / clock.seconds["engine_bf16"], 2)
    return out


def bench_single_rows(loaded, dialogues, cfg) -> dict:
    """Row 2: one request at a time (batch 1): plain generate vs prompt lookup."""
    from finetuneflow.engine.generation import GenerationSettings
    settings = GenerationSettings(num_beams=cfg.NUM_BEAMS, max_new_tokens=cfg.MAX_NEW_TOKENS)
    methods = {"one_row_plain": engine(loaded, settings, 1, cfg.MAX_INPUT_LENGTH, speedups=False),
               "one_row_prompt_lookup": engine(loaded, settings, 1, cfg.MAX_INPUT_LENGTH)}
    clock = run_rounds(methods, [[i] for i in range(len(dialogues))], dialogues)
    plain, lookup = clock.seconds["one_row_plain"], clock.seconds["one_row_prompt_lookup"]
    return {"rows": len(dialogues), "plain": clock.row("one_row_plain", len(dialogues)),
            "prompt_lookup": clock.row("one_row_prompt_lookup", len(dialogues)),
            "speedup": round(plain / lookup, 2), "differing": clock.differing("one_row_prompt_lookup", "one_row_plain")}


def bench_quality(loaded, bf16, cfg) -> dict:
    """Row 4: bf16 vs fp32 summaries of the held-out rows (RESULTS.md protocol): identical share,
    ROUGE-L of each and the paired bootstrap interval of bf16 - fp32."""
    from finetuneflow.contract.data import get_split, load_dialogues, subset
    from finetuneflow.engine.generation import GenerationSettings, summarize
    from finetuneflow.quality import metrics as M
    data = load_dialogues(cfg.DATASET, val_fraction=HELD_OUT["val_fraction"], test_fraction=HELD_OUT["test_fraction"],
                          seed=HELD_OUT["seed"])
    rows = subset(get_split(data, HELD_OUT["split"]), cfg.QUALITY_ROWS, seed=0, shuffle=False)
    settings = GenerationSettings(num_beams=1, max_new_tokens=HELD_OUT_DECODING["max_new_tokens"],
                                  no_repeat_ngram_size=HELD_OUT_DECODING["no_repeat_ngram_size"])
    dialogues, references = [r["dialogue"] for r in rows], [r["summary"] for r in rows]
    runs = {name: summarize(model, dialogues, settings, cfg.BATCH_SIZE, HELD_OUT_DECODING["max_input_length"],
                            progress=False) for name, model in (("fp32", loaded), ("bf16", bf16))}
    scores = {name: [s["rougeL"] for s in M.rouge_per_sample(run.summaries, references)] for name, run in runs.items()}
    paired = M.paired_bootstrap(scores["fp32"], scores["bf16"], n_samples=1000)
    same = sum(a == b for a, b in zip(runs["fp32"].summaries, runs["bf16"].summaries))
    return {"rows": len(rows), "identical": same, "identical_share": round(same / len(rows), 3),
            "rougeL_fp32": round(paired.mean_a, 2), "rougeL_bf16": round(paired.mean_b, 2),
            "delta_rougeL": round(paired.difference, 2), "ci95": [round(paired.low, 2), round(paired.high, 2)],
            "p_value": round(paired.p_value, 3), "statement": paired.statement("ROUGE-L", "fp32", "bf16"),
            "seconds": {name: round(run.seconds, 1) for name, run in runs.items()}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_sharded(model: str, cfg) -> dict:
    """Row 5: eval_bart_lora.py in one process (torch's threads) vs `accelerate launch` with
    SHARDED processes (one thread each), alternately twice; CSVs compared byte for byte."""
    from finetuneflow.contract.paths import resolve
    root = Path(tempfile.mkdtemp(prefix="ftf_sharded_"))
    args = [f"--model={resolve(model) if resolve(model).exists() else model}",
            f"--dataset={resolve(cfg.DATASET) if resolve(cfg.DATASET).exists() else cfg.DATASET}",
            "--split=all", f"--n_samples={cfg.SHARDED_ROWS}", f"--batch_size={cfg.BATCH_SIZE}",
            f"--max_new_tokens={cfg.MAX_NEW_TOKENS}", f"--max_input_length={cfg.MAX_INPUT_LENGTH}",
            f"--num_beams={cfg.NUM_BEAMS}", "--wandb=false", "--output_dir=metrics",
            "--allow_overlap=True"]   # a speed and identity comparison: the rows may be a fine-tuned model's own
    env = {**os.environ, "FTF_ROOT": str(root), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
              str(cfg.SHARDED), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    walls = {"one_process": [], "sharded": []}
    for attempt in range(2):
        for kind in (("one_process", "sharded") if attempt == 0 else ("sharded", "one_process")):
            command = ([sys.executable] if kind == "one_process" else [*launch, "--main_process_port",
                                                                       str(_free_port())])
            command += [str(REPO / "eval_bart_lora.py"), *args, f"--tag={kind}{attempt}"]
            start = time.perf_counter()
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
            walls[kind].append(time.perf_counter() - start)
    metrics = root / "metrics"
    csvs = {f.name: f.read_bytes() for f in metrics.glob("*_predictions.csv")}
    generation = {kind: [json.loads((metrics / f"{kind}{a}_eval.json").read_text())["timing"]["seconds"]
                         for a in range(2)] for kind in walls}
    one, many = sum(walls["one_process"]), sum(walls["sharded"])
    return {"processes": cfg.SHARDED, "rows": cfg.SHARDED_ROWS, "wall_seconds": walls, "generation_seconds": generation,
            "speedup_wall": round(one / many, 2),
            "speedup_generation": round(sum(generation["one_process"]) / sum(generation["sharded"]), 2),
            "csv_identical": len(set(csvs.values())) == 1, "csvs": sorted(csvs), "folder": str(root)}


def print_rows(name: str, result: dict) -> None:
    batched = result["batched"]
    seed = batched["seed_loop"]
    print(f"{name}: seed loop {seed['samples_per_s']:.3f} samples/s ({seed['tokens_per_s']:.1f} tok/s)")
    for method in ("engine_plain", "engine", "engine_bf16"):
        if method in batched:
            row = batched[method]
            print(f"  {method:>13}: {row['samples_per_s']:.3f} samples/s ({row['tokens_per_s']:.1f} tok/s) | "
                  f"{row['speedup_vs_seed']:.2f}x the seed loop | predictions "
                  + ("identical" if not row["differing_from_seed"] else
                     f"differ on {row['differing_from_seed']} of {result['samples']}")
                  + (f" | {row['speedup_vs_fp32_engine']:.2f}x the fp32 engine" if "speedup_vs_fp32_engine" in row
                     else ""))
    if "bf16_skipped" in result:
        print(f"  bf16: skipped ({result['bf16_skipped']})")
    if "single_rows" in result:
        single = result["single_rows"]
        print(f"  one row at a time ({single['rows']} rows): prompt lookup {single['speedup']:.2f}x plain generate; "
              f"differing {single['differing']}")
    if "quality" in result:
        q = result["quality"]
        print(f"  bf16 vs fp32 on {q['rows']} held-out rows: {q['identical']} identical ({q['identical_share']:.0%}); "
              f"{q['statement']}")
    if "sharded" in result:
        s = result["sharded"]
        print(f"  sharded eval, {s['processes']} processes vs 1 ({s['rows']} rows, 2 runs each): "
              f"{s['speedup_wall']:.2f}x wall clock, {s['speedup_generation']:.2f}x generation; CSV "
              + ("identical" if s["csv_identical"] else "DIFFERENT"))


def bench_model(name: str, dialogues: list[str], cfg) -> dict:
    import torch
    from finetuneflow.engine.generation import GenerationSettings, summarize
    from finetuneflow.model.precision import cpu_bf16
    from finetuneflow.model.loading import load_model
    loaded = load_model(name, device="cpu", dtype=torch.float32)
    bf16, result = None, {"model": str(name), "family": loaded.family, "samples": len(dialogues)}
    if cfg.BF16 and cpu_bf16().native:
        bf16 = load_model(name, device="cpu", dtype=torch.bfloat16)
    elif cfg.BF16:
        result["bf16_skipped"] = "this CPU has no bf16 instructions"
    warm = GenerationSettings(num_beams=1, max_new_tokens=4, min_new_tokens=1)
    for model in filter(None, (loaded, bf16)):   # first-call allocations, excluded from every timing
        summarize(model, dialogues[:2], warm, 2, cfg.MAX_INPUT_LENGTH, progress=False)
    result["batched"] = bench_batched(loaded, bf16, dialogues, cfg)
    if cfg.SINGLE_ROWS and loaded.family == "causal":
        result["single_rows"] = bench_single_rows(loaded, dialogues[:cfg.SINGLE_ROWS], cfg)
    if cfg.QUALITY_ROWS and bf16 is not None:
        result["quality"] = bench_quality(loaded, bf16, cfg)
    if cfg.SHARDED > 1:
        result["sharded"] = bench_sharded(name, cfg)
    return result


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    import platform

    import torch
    from finetuneflow.contract.data import get_split, load_dialogues, subset
    from finetuneflow.model.precision import cpu_bf16
    if cfg.THREADS:
        torch.set_num_threads(cfg.THREADS)
    data = load_dialogues(cfg.DATASET, val_fraction=0, test_fraction=0)   # a single file stays one "train" split
    dialogues = [r["dialogue"] for r in subset(get_split(data, cfg.SPLIT), cfg.N_SAMPLES, seed=0, shuffle=False)]
    models, temp = list(cfg.MODELS), None
    if "tiny" in models:
        from finetuneflow.model.tiny import build_tiny_bart, build_tiny_llama
        temp = tempfile.TemporaryDirectory()
        i = models.index("tiny")
        models[i:i + 1] = [str(build_tiny_bart(temp.name)), str(build_tiny_llama(temp.name))]
    probe = cpu_bf16()
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "bf16": probe.source if probe.native else None,
               "load_average": os.getloadavg()}
    print(f"{len(dialogues)} dialogues from {data.source}; greedy={cfg.NUM_BEAMS == 1}, max_new_tokens="
          f"{cfg.MAX_NEW_TOKENS}, engine batch {cfg.BATCH_SIZE}; {machine['threads']} CPU threads of "
          f"{machine['cores']} cores, bf16 {machine['bf16'] or 'none'}, load {machine['load_average'][0]:.1f}")
    results = []
    for name in models:
        result = bench_model(name, dialogues, cfg)
        results.append(result)
        print_rows(Path(name).name, result)
    machine["load_average_after"] = os.getloadavg()
    record = {"dataset": data.source, "samples": len(dialogues), "machine": machine, "results": results}
    if cfg.OUTPUT_JSON:
        from finetuneflow.contract.io import atomic_write_json
        from finetuneflow.contract.paths import resolve
        atomic_write_json(resolve(cfg.OUTPUT_JSON), record)
    if temp is not None:
        temp.cleanup()
    return record


if __name__ == "__main__":
    run_cli(main)
