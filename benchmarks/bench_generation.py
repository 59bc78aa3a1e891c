"""Benchmark: the seed's evaluation loop vs FineTuneFlow's generation engine, side by side.

The seed's eval_bart_lora.py summarizes one dialogue at a time: tokenize with truncation,
`generate`, decode. The engine (finetuneflow/engine/generation.py) sorts inputs by length and
generates BATCH_SIZE at a time with padding. Both run here on the same model, the same samples
and the same decoding settings (greedy by default), in one process, one after the other; the
script prints samples/s and generated tokens/s of each, the speed-up, and whether the
predictions are identical.

Reads:  MODELS (model folders or Hub ids; "tiny" = the tiny BART and tiny Llama built on the fly), DATASET
Writes: OUTPUT_JSON (optional) with every number printed
Run as:
    python benchmarks/bench_generation.py                                   # tiny models, bundled samples
    python benchmarks/bench_generation.py --models=/tmp/smollm2 \\
        --dataset=../shared/data/dialogsum_dev500.jsonl --n_samples=24
"""
MODELS = ["tiny"]                      # model folders / Hub ids; "tiny" = tiny BART + tiny Llama (built in a temp folder)
DATASET = "data/samples/dialogues.jsonl"  # local file or Hub id (rows: id, dialogue, summary)
SPLIT = "train"                        # split to take the rows from (a single local file is all "train")
N_SAMPLES = 24                         # [int >= 0] dialogues summarized by each method
BATCH_SIZE = 8                         # [int >= 1] the engine's batch size
NUM_BEAMS = 1                          # [int >= 1 | None] 1 = greedy; the same for both methods
MAX_NEW_TOKENS = 64                    # [int >= 1 | None] summary token limit, the same for both methods
MAX_INPUT_LENGTH = 768                 # [int >= 16] input tokens (the seed truncated at 768)
THREADS = 0                            # [int >= 0] torch CPU threads (0 = torch's default; 1 is steadier on a shared, busy CPU)
PREFILL_SPLIT = True                   # also time 1-token runs of both methods to split prompt reading from decoding
OUTPUT_JSON = ""                       # also write the results here ("" = print only)

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetuneflow.contract.settings import configure  # noqa: E402
from finetuneflow.contract.errors import run_cli  # noqa: E402


def seed_loop(loaded, dialogues, effective, instruction, max_input_length) -> tuple[list[str], int, float]:
    """The seed's way: one dialogue per generate() call, no sorting, no padding."""
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
            generated += finish(new.tolist(), stops, effective.get("max_new_tokens"))[0].counted
            summaries.append(loaded.tokenizer.decode(new[0], skip_special_tokens=True).strip())
    return summaries, generated, time.perf_counter() - start


def bench_model(name: str, dialogues: list[str], cfg) -> dict:
    from finetuneflow.engine.generation import GenerationSettings, effective_settings, summarize
    from finetuneflow.model.loading import load_model
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    loaded = load_model(name, device="cpu")
    settings = GenerationSettings(num_beams=cfg.NUM_BEAMS, max_new_tokens=cfg.MAX_NEW_TOKENS)
    effective = effective_settings(loaded, settings)
    # warm-up (first-call allocations), excluded from both timings
    summarize(loaded, dialogues[:1], GenerationSettings(num_beams=1, max_new_tokens=4, min_new_tokens=1), 1, cfg.MAX_INPUT_LENGTH,
              progress=False)
    seed, seed_tokens, seed_seconds = seed_loop(loaded, dialogues, effective, DEFAULT_INSTRUCTION, cfg.MAX_INPUT_LENGTH)
    engine = summarize(loaded, dialogues, settings, cfg.BATCH_SIZE, cfg.MAX_INPUT_LENGTH, DEFAULT_INSTRUCTION,
                       progress=False)
    differing = sum(a != b for a, b in zip(seed, engine.summaries))
    split = {}
    if cfg.PREFILL_SPLIT:
        # Reading the prompt (prefill) is compute-bound: batching cannot make it cheaper, so the
        # share it takes bounds the overall speed-up; decoding is where batches pay off.
        one = GenerationSettings(num_beams=cfg.NUM_BEAMS, max_new_tokens=1, min_new_tokens=1)
        _, _, seed_prefill = seed_loop(loaded, dialogues, effective_settings(loaded, one), DEFAULT_INSTRUCTION,
                                       cfg.MAX_INPUT_LENGTH)
        engine_prefill = summarize(loaded, dialogues, one, cfg.BATCH_SIZE, cfg.MAX_INPUT_LENGTH, DEFAULT_INSTRUCTION,
                                   progress=False).seconds
        split = {"seed_prefill_seconds": round(seed_prefill, 2), "engine_prefill_seconds": round(engine_prefill, 2),
                 "decode_speedup": round((seed_seconds - seed_prefill) / max(1e-9, engine.seconds - engine_prefill), 2)}
    return {"model": str(name), "family": loaded.family, "samples": len(dialogues), "settings": effective,
            "seed_loop": {"seconds": round(seed_seconds, 2), "samples_per_s": round(len(dialogues) / seed_seconds, 3),
                          "tokens_per_s": round(seed_tokens / seed_seconds, 2), "generated_tokens": seed_tokens},
            "engine": {"batch_size": cfg.BATCH_SIZE, **engine.timing()},
            "speedup": round(seed_seconds / engine.seconds, 2), "differing_predictions": differing, **split}


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    import torch
    from finetuneflow.contract.data import get_split, load_dialogues, subset
    if cfg.THREADS:
        torch.set_num_threads(cfg.THREADS)
    data = load_dialogues(cfg.DATASET, val_fraction=0, test_fraction=0)   # a single file stays one "train" split
    rows = subset(get_split(data, cfg.SPLIT), cfg.N_SAMPLES, seed=0, shuffle=False)
    dialogues = [r["dialogue"] for r in rows]
    models = list(cfg.MODELS)
    temp = None
    if "tiny" in models:
        from finetuneflow.model.tiny import build_tiny_bart, build_tiny_llama
        temp = tempfile.TemporaryDirectory()
        i = models.index("tiny")
        models[i:i + 1] = [str(build_tiny_bart(temp.name)), str(build_tiny_llama(temp.name))]
    print(f"{len(dialogues)} dialogues from {data.source}; greedy={cfg.NUM_BEAMS == 1}, max_new_tokens="
          f"{cfg.MAX_NEW_TOKENS}, engine batch {cfg.BATCH_SIZE}; CPU threads {torch.get_num_threads()}")
    results = []
    for name in models:
        result = bench_model(name, dialogues, cfg)
        results.append(result)
        seed, engine = result["seed_loop"], result["engine"]
        print(f"{Path(name).name:>24}: seed loop {seed['samples_per_s']:.3f} samples/s ({seed['tokens_per_s']:.1f} tok/s) | "
              f"engine {engine['samples_per_s']:.3f} samples/s ({engine['tokens_per_s']:.1f} tok/s) | "
              f"speed-up {result['speedup']:.2f}x | predictions "
              + ("identical" if not result["differing_predictions"] else
                 f"differ on {result['differing_predictions']} of {result['samples']}"))
        if "decode_speedup" in result:
            print(f"{'':>24}  prompt prefill (1-token runs): seed loop {result['seed_prefill_seconds']:.1f} s, engine "
                  f"{result['engine_prefill_seconds']:.1f} s of {seed['seconds']:.1f} s / {engine['seconds']:.1f} s; "
                  f"decoding alone {result['decode_speedup']:.2f}x")
    record = {"dataset": data.source, "samples": len(dialogues), "threads": torch.get_num_threads(), "results": results}
    if cfg.OUTPUT_JSON:
        from finetuneflow.contract.io import atomic_write_json
        from finetuneflow.contract.paths import resolve
        atomic_write_json(resolve(cfg.OUTPUT_JSON), record)
    if temp is not None:
        temp.cleanup()
    return record


if __name__ == "__main__":
    run_cli(main)
