"""Benchmark the runtimes an export ships to: the transformers engine (fp32) vs llama.cpp GGUF (q8_0,
q4_k_m) vs CTranslate2 int8, on the same held-out rows, for speed AND summary quality.

Reads:  MODEL (a Hugging Face folder: the clean merged model, or ft_outputs/base_smollm2 from import_gguf.py)
        DATASET (the same rows for every runtime; rows MODEL was trained on are dropped and counted)
Writes: WORK_DIR/ (the GGUF and CT2 exports it measures; reused when present), OUTPUT (JSON with the numbers)

Run as:
    python benchmarks/bench_export.py --model=ft_outputs/base_smollm2
    # the fine-tuned SmolLM2 of RESULTS.md on its 100 held-out DialogSum rows (its evaluation split):
    python benchmarks/bench_export.py --model=ft_outputs/smollm2_clean_dialogsum \
        --dataset=../shared/data/dialogsum_dev500.jsonl --split=validation --val_fraction=0.2 --test_fraction=0 \
        --n_samples=0 --output=metrics/bench_export_dialogsum.json

One run, the same rows, the same prompt and the same greedy decoding for every runtime, all through
the project's one engine (engine/generation.py `summarize`: llama.cpp decodes each batch as parallel
sequences of one context, CTranslate2 and transformers as padded batches). Each runtime gets one
warm-up batch first. Per runtime: samples/s and generated tokens/s, the speed-up over transformers,
ROUGE-1/2/L, and ROUGE-L(runtime) - ROUGE-L(transformers) with a paired-bootstrap 95% CI and the
deploy gate's verdict (ship: not significantly worse), plus the share of identical summaries. The
machine (CPU model, cores, threads) is recorded with the numbers. GGUF rows need llama-cpp-python;
without it they say skipped.
"""
MODEL = "ft_outputs/base_smollm2"     # Hugging Face model folder to benchmark
DATASET = "data/samples/dialogues.jsonl"  # rows with reference summaries (file or Hub id)
SPLIT = "test"                         # split to take them from (all: every row)
N_SAMPLES = 16                         # [int >= 0] rows summarized by every runtime (0 = all of the split)
SEED = None                            # [int >= 0 | None] split/selection seed; None: MODEL's training seed, else 42
VAL_FRACTION = None                    # [0 <= float < 1 | None] validation share of one file; None: training's
TEST_FRACTION = None                   # [0 <= float < 1 | None] test share of one file; None: training's
BATCH_SIZE = 8                         # [int >= 1] dialogues per generate call, every runtime
INSTRUCTION = None                     # [str | None] causal prompt; None: MODEL's record, else the default
MAX_INPUT_LENGTH = None                # [int >= 16 | None] prompt tokens; None: MODEL's record, else 512
MAX_NEW_TOKENS = None                  # [int >= 1 | None] summary tokens (greedy); None: MODEL's record, else 64
NO_REPEAT_NGRAM_SIZE = None            # [int >= 0 | None] None: MODEL's record, else 0
CT2_QUANTIZATION = "int8"              # [int8 | int8_float32 | float32 | off] CTranslate2 weights (off: no CT2 row)
GGUF_OUTTYPES = ["q8_0", "q4_k_m"]     # [list[f32 | f16 | bf16 | q8_0 | q6_k | q5_k_m | q4_k_m]] GGUF types
THREADS = 0                            # [int >= 0] CPU threads, the same for every runtime (0 = every core)
WORK_DIR = "outputs/bench_export"      # where the exports are written (reused when present)
OUTPUT = "metrics/bench_export.json"   # the results

import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.contract.io import atomic_dir, atomic_write_json
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord, read_record, write_record
from finetuneflow.contract.settings import configure

TRANSFORMERS = "transformers fp32"


def machine() -> dict:
    """The CPU the numbers come from."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else None, "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version()}


# ----------------------------------------------------------------------------- exports (reused when present)

def ct2_export(model: Path, out: Path, quantization: str) -> Path:
    from finetuneflow.contract.record import Lineage
    from finetuneflow.ship.ct2_export import convert_to_ct2
    if not (out / "model.bin").is_file():
        with atomic_dir(out) as tmp:
            convert_to_ct2(model, tmp, quantization)
            write_record(tmp, RunRecord("bench_export", backend="ctranslate2",
                                        lineage=Lineage(exported_from=str(model))))
    return out


def gguf_exports(model: Path, work: Path, outtypes: list[str]) -> dict[str, Path]:
    """{type: file}: converter types directly, k-quants from one f16 file (as export_gguf.py makes them)."""
    from finetuneflow.contract.io import atomic_path
    from finetuneflow.ship.gguf_export import run_converter
    from finetuneflow.ship.quantize import CONVERTER_TYPES, quantize
    files = {kind: work / f"{model.name}-{kind}.gguf" for kind in outtypes}
    for kind, path in files.items():
        if path.is_file():
            continue
        if kind in CONVERTER_TYPES:
            with atomic_path(path) as tmp:
                run_converter(model, tmp, kind, None)
        else:
            source = gguf_exports(model, work, ["f16"])["f16"]
            quantize(source, path, kind, log=lambda *_: None)
    return files


# ----------------------------------------------------------------------------- rows and decoding

def rows_and_decoding(cfg, model: Path) -> tuple[list[dict], object, list[str]]:
    """The rows (held out from MODEL's training, counted) and the one decoding every runtime uses."""
    from finetuneflow.contract.data import get_split, load_dialogues, subset, training_overlap
    from finetuneflow.contract.decoding import GenerationSettings
    from finetuneflow.contract.paths import CODE_ROOT
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    from finetuneflow.ship.gate_rows import Decoding
    record = read_record(model) or RunRecord("unknown")
    record.inherit_into(cfg, ("SEED", "VAL_FRACTION", "TEST_FRACTION", "INSTRUCTION", "MAX_INPUT_LENGTH",
                              "MAX_NEW_TOKENS", "NO_REPEAT_NGRAM_SIZE"))
    defaults = {"SEED": 42, "VAL_FRACTION": 0.1, "TEST_FRACTION": 0.1, "INSTRUCTION": DEFAULT_INSTRUCTION,
                "MAX_INPUT_LENGTH": 512, "MAX_NEW_TOKENS": 64, "NO_REPEAT_NGRAM_SIZE": 0}
    for name, value in defaults.items():
        if cfg[name] is None:
            cfg[name] = value
    dataset = cfg.DATASET if resolve(cfg.DATASET).exists() or not (CODE_ROOT / cfg.DATASET).exists() \
        else str(CODE_ROOT / cfg.DATASET)
    data = load_dialogues(dataset, seed=cfg.SEED, val_fraction=cfg.VAL_FRACTION, test_fraction=cfg.TEST_FRACTION,
                          normalize=bool(record.split.normalize) if record.split else False)
    rows = [{"id": str(r["id"]), "dialogue": r["dialogue"], "summary": r["summary"]}
            for r in subset(get_split(data, cfg.SPLIT), cfg.N_SAMPLES, cfg.SEED, shuffle=False)]
    trained = set(training_overlap(rows, record.split) or [])
    notes = [f"{len(trained)} of {len(rows)} rows were training rows of {model.name} and were dropped"] if trained \
        else []
    rows = [r for r in rows if r["id"] not in trained]
    if not rows:
        raise UserError(f"no held-out rows in split {cfg.SPLIT!r} of {cfg.DATASET}; choose another split")
    generation = GenerationSettings(num_beams=1, max_new_tokens=cfg.MAX_NEW_TOKENS,
                                    no_repeat_ngram_size=cfg.NO_REPEAT_NGRAM_SIZE, length_penalty=1.0)
    return rows, Decoding(cfg.INSTRUCTION, cfg.MAX_INPUT_LENGTH, "truncate", generation), notes


# ----------------------------------------------------------------------------- measuring

def measure(name: str, load, rows: list[dict], decoding, batch_size: int, reference: dict | None) -> dict:
    """One runtime: its summaries of the rows (after a warm-up batch), speed and quality."""
    from finetuneflow.ship.deploy_gate import run_side
    from finetuneflow.ship.gate_verdict import judge, scores_of
    loaded = load()
    try:
        side = run_side(loaded, rows, decoding, batch_size, "run now")
    finally:
        loaded.backend.close(loaded)   # llama.cpp frees its contexts now (the others: when collected)
    scores = scores_of(side.summaries, rows)
    row = {**side.timing, "batch_size": batch_size, "backend": loaded.backend.name, "dtype": str(loaded.dtype),
           **{k: round(sum(s[k] for s in scores) / len(scores), 2) for k in ("rouge1", "rouge2", "rougeL")},
           "summaries": side.summaries, "_scores": scores}
    if reference is not None:
        verdict = judge(reference["_scores"], scores, reference["summaries"], side.summaries)
        row.update(verdict, speedup_samples_per_s=round(row["samples_per_s"] / reference["samples_per_s"], 2),
                   speedup_tokens_per_s=round(row["tokens_per_s"] / reference["tokens_per_s"], 2))
    print(line(name, row), flush=True)
    return row


def line(name: str, row: dict) -> str:
    text = f"{name:>24}: {row['samples_per_s']:.3f} samples/s, {row['tokens_per_s']:.1f} tokens/s, ROUGE-L " \
           f"{row['rougeL']:.2f}"
    if "delta_rougeL" in row:
        d = row["delta_rougeL"]
        text += (f"; {row['speedup_samples_per_s']}x samples/s, ΔROUGE-L {d['mean']:+.2f} [{d['low']:+.2f}, "
                 f"{d['high']:+.2f}] -> {row['verdict']}, identical {row['identical']}/{len(row['summaries'])}")
    return text


def runtimes(cfg, model: Path, work: Path) -> list[tuple[str, object, str | None]]:
    """(name, loader, why skipped) for every runtime, transformers first."""
    import torch
    from finetuneflow.model.loading import load_model
    found = [(TRANSFORMERS, lambda: load_model(str(model), device="cpu", dtype=torch.float32), None)]
    if cfg.GGUF_OUTTYPES:
        try:
            import llama_cpp  # noqa: F401
            skipped = None
        except ImportError:
            skipped = "llama-cpp-python is not installed (make install-llama)"
        files = gguf_exports(model, work, cfg.GGUF_OUTTYPES) if skipped is None else {}
        for kind in cfg.GGUF_OUTTYPES:
            found.append((f"llama.cpp {kind}", (lambda f=files.get(kind): load_model(str(f))), skipped))
    if cfg.CT2_QUANTIZATION != "off":
        ct2_dir = work / f"ct2-{cfg.CT2_QUANTIZATION}"
        found.append((f"ctranslate2 {cfg.CT2_QUANTIZATION}",
                      lambda: load_model(str(ct2_export(model, ct2_dir, cfg.CT2_QUANTIZATION)), device="cpu"), None))
    return found


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    import torch
    threads = cfg.THREADS or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)   # the same threads for every runtime
    os.environ["FTF_CT2_THREADS"] = os.environ["FTF_LLAMA_THREADS"] = str(threads)
    from finetuneflow.contract.paths import require
    from finetuneflow.model.backends.llamacpp_bindings import default_threads
    model = require(cfg.MODEL, produced_by="import_gguf.py or post_merge_cleanup.py", what="model folder")
    rows, decoding, notes = rows_and_decoding(cfg, model)
    work = resolve(cfg.WORK_DIR)
    print(f"{len(rows)} rows of {cfg.DATASET} ({cfg.SPLIT}), greedy, {decoding.generation.max_new_tokens} new tokens, "
          f"input {decoding.max_input_length} tokens, batch {cfg.BATCH_SIZE}; machine: {machine()['cpu']}")
    results, reference = {}, None
    for name, load, skipped in runtimes(cfg, model, work):
        if skipped:
            results[name] = {"skipped": skipped}
            print(f"{name:>24}: skipped: {skipped}")
            continue
        results[name] = measure(name, load, rows, decoding, cfg.BATCH_SIZE, reference)
        reference = reference or results[name]
    for row in results.values():
        row.pop("_scores", None)
    report = {"model": str(model), "rows": len(rows), "dataset": cfg.DATASET, "split": cfg.SPLIT,
              "decoding": decoding.as_dict(), "batch_size": cfg.BATCH_SIZE, "machine": machine(),
              "threads": {"torch": torch.get_num_threads(), "llama.cpp": default_threads(),
                          "ctranslate2": int(os.environ.get("FTF_CT2_THREADS", "0")) or "default"},
              "notes": notes, "runtimes": results,
              "examples": [{"id": rows[i]["id"], **{name: r["summaries"][i] for name, r in results.items()
                                                    if "summaries" in r}} for i in range(min(3, len(rows)))]}
    out = resolve(cfg.OUTPUT)
    atomic_write_json(out, report)
    write_record(out.parent, RunRecord("bench_export"), cfg, [model], name=f"{out.stem}.run_config.json")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    run_cli(main)
