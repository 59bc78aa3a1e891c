"""Benchmark the CPU runtimes an export targets: transformers fp32 vs GGUF (llama.cpp) vs CTranslate2 int8.

Reads:  MODEL (a Hugging Face folder: ft_outputs/base_smollm2 from import_gguf.py, or a merged model)
        DATASET (the same dialogues for every runtime)
Writes: WORK_DIR/ (the GGUF and CT2 exports it measures), OUTPUT (JSON with the numbers)

Run as:
    python import_gguf.py --output_dir=ft_outputs/base_smollm2
    python benchmarks/bench_export.py --model=ft_outputs/base_smollm2 --batch_size=8

One run, same dialogues, same greedy decoding and the same prompt for every runtime (the shared
engine's summarize(); llama.cpp gets the same prompt token ids). Each runtime gets one short
warm-up call first. GGUF is measured only when llama-cpp-python is installed (it compiles
llama.cpp, so the toolkit does not install it); otherwise its row says skipped.
"""
MODEL = "ft_outputs/base_smollm2"     # Hugging Face model folder to benchmark
DATASET = "data/samples/dialogues.jsonl"  # dialogues (file or Hub id)
SPLIT = "train"                        # split to take them from
N_SAMPLES = 16                         # [int >= 0] dialogues summarized by every runtime
SEED = 42                              # [int >= 0] dialogue selection seed
BATCH_SIZE = 8                         # [int >= 1] dialogues per generate call (llama.cpp: one at a time)
MAX_INPUT_LENGTH = 512                 # [int >= 16] prompt tokens
MAX_NEW_TOKENS = 64                    # [int >= 1 | None] summary tokens (greedy)
CT2_QUANTIZATION = "int8"              # CTranslate2 weights
GGUF_OUTTYPE = "q8_0"                  # GGUF weights (measured with llama-cpp-python when installed)
THREADS = 0                            # [int >= 0] CPU threads for torch and CTranslate2 (0 = each library's default)
WORK_DIR = "outputs/bench_export"      # where the exports are written (reused when present)
OUTPUT = "metrics/bench_export.json"   # the results

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.io import atomic_dir, atomic_write_json
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord, write_record
from finetuneflow.contract.settings import configure


def ct2_export(model: Path, out: Path, quantization: str) -> Path:
    from finetuneflow.contract.record import Lineage
    from finetuneflow.ship.ct2_export import convert_to_ct2
    if not (out / "model.bin").is_file():
        with atomic_dir(out) as tmp:
            convert_to_ct2(model, tmp, quantization)
            write_record(tmp, RunRecord("bench_export", backend="ctranslate2",
                                        lineage=Lineage(exported_from=str(model))))
    return out


def llama_cpp_row(model: Path, work: Path, outtype: str, prompts: list[list[int]], max_new: int,
                  stops: list[str]) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python compiles llama.cpp)"}
    from finetuneflow.contract.io import atomic_path
    from finetuneflow.ship.gguf_export import run_converter
    gguf = work / f"{model.name}-{outtype}.gguf"
    if not gguf.is_file():
        with atomic_path(gguf) as tmp:
            run_converter(model, tmp, outtype, None)
    llm = Llama(model_path=str(gguf), n_ctx=max(len(p) for p in prompts) + max_new + 8, verbose=False, seed=0)
    llm.create_completion(prompt=prompts[0][:16], max_tokens=4, temperature=0.0)   # warm-up
    tokens, start, summaries = 0, time.perf_counter(), []
    for ids in prompts:   # llama-cpp-python decodes one sequence at a time
        out = llm.create_completion(prompt=ids, max_tokens=max_new, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                    stop=stops)
        tokens += out["usage"]["completion_tokens"]
        summaries.append(out["choices"][0]["text"].strip())
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "samples_per_s": round(len(prompts) / seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1), "generated_tokens": tokens, "summaries": summaries,
            "batch_size": 1, "gguf": str(gguf)}


def load_dialogues_for(cfg) -> list[str]:
    from finetuneflow.contract.data import get_split, load_dialogues, subset
    from finetuneflow.contract.paths import CODE_ROOT
    dataset = cfg.DATASET if resolve(cfg.DATASET).exists() or not (CODE_ROOT / cfg.DATASET).exists() \
        else str(CODE_ROOT / cfg.DATASET)
    rows = subset(get_split(load_dialogues(dataset, seed=cfg.SEED), cfg.SPLIT), cfg.N_SAMPLES, cfg.SEED)
    return [r["dialogue"] for r in rows]


def measure(cfg, model: Path, dialogues: list[str]):
    """transformers fp32 and CTranslate2 side by side, same dialogues and greedy settings."""
    from finetuneflow.engine.generation import GenerationSettings, summarize
    from finetuneflow.model.loading import load_model
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    work = resolve(cfg.WORK_DIR)
    settings = GenerationSettings(num_beams=1, max_new_tokens=cfg.MAX_NEW_TOKENS, no_repeat_ngram_size=0)
    ct2_dir = work / f"ct2-{cfg.CT2_QUANTIZATION}"
    runtimes = [("transformers fp32", lambda: load_model(str(model), device="cpu", dtype=torch.float32)),
                (f"ctranslate2 {cfg.CT2_QUANTIZATION}",
                 lambda: load_model(str(ct2_export(model, ct2_dir, cfg.CT2_QUANTIZATION)), device="cpu"))]
    rows, outputs, reference, hf = {}, {}, None, None
    for name, load in runtimes:
        loaded = load()
        hf = hf or loaded
        summarize(loaded, dialogues[:1], GenerationSettings(num_beams=1, max_new_tokens=4), 1, cfg.MAX_INPUT_LENGTH,
                  DEFAULT_INSTRUCTION, progress=False)   # warm-up: first-call allocations are not throughput
        result = summarize(loaded, dialogues, settings, cfg.BATCH_SIZE, cfg.MAX_INPUT_LENGTH, DEFAULT_INSTRUCTION,
                           progress=False)
        reference = reference or result.summaries
        outputs[name] = result.summaries
        rows[name] = {**result.timing(), "batch_size": cfg.BATCH_SIZE,
                      "identical_to_transformers": sum(a == b for a, b in zip(result.summaries, reference))}
        print(f"{name:>22}: {result.samples_per_s:.3f} summaries/s, {result.tokens_per_s:.1f} tokens/s "
              f"({result.generated_tokens} tokens in {result.seconds:.1f} s)")
    return rows, outputs, hf, work


def gguf_row(cfg, model: Path, work: Path, hf, dialogues: list[str]) -> dict:
    from finetuneflow.engine.generation import encode
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION, stop_token_ids
    if hf.family != "causal":
        return {"skipped": "llama.cpp has no encoder-decoder support for this architecture"}
    prompts = [encode(hf, d, DEFAULT_INSTRUCTION, cfg.MAX_INPUT_LENGTH)[0] for d in dialogues]
    stops = [hf.tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(hf.tokenizer)]
    row = llama_cpp_row(model, work, cfg.GGUF_OUTTYPE, prompts, cfg.MAX_NEW_TOKENS, stops)
    label = f"gguf {cfg.GGUF_OUTTYPE} (llama.cpp)"
    print(f"{label:>22}: " + (f"skipped: {row['skipped']}" if "skipped" in row else
                              f"{row['samples_per_s']:.3f} summaries/s, {row['tokens_per_s']:.1f} tokens/s (batch 1)"))
    return row


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    if cfg.THREADS:   # equal threads for both runtimes; 1 is the fair choice on a machine shared with other jobs
        torch.set_num_threads(cfg.THREADS)
        os.environ["FTF_CT2_THREADS"] = str(cfg.THREADS)
    from finetuneflow.contract.paths import require
    model = require(cfg.MODEL, produced_by="import_gguf.py", what="model folder")
    dialogues = load_dialogues_for(cfg)
    rows, outputs, hf, work = measure(cfg, model, dialogues)
    rows[f"gguf {cfg.GGUF_OUTTYPE} (llama.cpp)"] = gguf_row(cfg, model, work, hf, dialogues)
    base = rows["transformers fp32"]
    for row in rows.values():
        if "tokens_per_s" in row:
            row["speedup_tokens_per_s"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2)
            row["speedup_samples_per_s"] = round(row["samples_per_s"] / base["samples_per_s"], 2)
    ct2_row = rows[f"ctranslate2 {cfg.CT2_QUANTIZATION}"]
    print(f"ctranslate2 {cfg.CT2_QUANTIZATION} / transformers fp32: {ct2_row['speedup_samples_per_s']}x summaries/s, "
          f"{ct2_row['speedup_tokens_per_s']}x tokens/s at batch {cfg.BATCH_SIZE}; "
          f"{ct2_row['identical_to_transformers']}/{len(dialogues)} summaries identical")
    report = {"model": str(model), "dialogues": len(dialogues), "max_input_length": cfg.MAX_INPUT_LENGTH,
              "max_new_tokens": cfg.MAX_NEW_TOKENS, "torch_threads": torch.get_num_threads(),
              "ct2_threads": int(os.environ.get("FTF_CT2_THREADS", "0")) or "default", "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "runtimes": rows,
              "examples": [{name: texts[i] for name, texts in outputs.items()} for i in range(min(2, len(dialogues)))]}
    out = resolve(cfg.OUTPUT)
    atomic_write_json(out, report)
    write_record(out.parent, RunRecord("bench_export"), cfg, [model], name=f"{out.stem}.run_config.json")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    run_cli(main)
