"""Benchmark: serve_api.py with and without micro-batching, same model, same requests, one run.

Reads:  MODEL (a model/adapter folder; "" builds the tiny Llama), DATASET (dialogues to send)
Writes: stdout (requests/s, p50/p95 latency of each mode and the ratios); OUTPUT_JSON when set

Run as:
    python benchmarks/bench_serving.py                                  # tiny model, seconds
    python benchmarks/bench_serving.py --model=ft_outputs/bart_merged_clean --requests=48 --concurrency=16
Each mode starts the real service (uvicorn on 127.0.0.1, a free port) as a subprocess, warms it up,
then sends REQUESTS single-dialogue requests with CONCURRENCY in flight at any time. Micro-batching
off means every request is generated alone; on, concurrent requests share a batch of up to BATCH_SIZE.
"""
MODEL = ""                             # model, merged or adapter folder; "" = tiny Llama built in a temp folder
DATASET = "data/samples/dialogues.jsonl"  # .jsonl with a "dialogue" field; requests cycle through it
MAX_CHARS = 1500                       # [int >= 1] dialogues longer than this are skipped (keeps requests comparable)
REQUESTS = 64                          # [int >= 1] requests per mode
CONCURRENCY = 16                       # [int >= 1] requests in flight at once
MAX_NEW_TOKENS = 16                    # [int >= 1 | None] tokens per summary (same in both modes)
BATCH_SIZE = 8                         # [int >= 1] micro-batch size of the service
BATCH_WAIT_MS = 10.0                   # [0 <= float <= 10000] micro-batch collection window (ms)
OUTPUT_JSON = ""                       # optional path for the numbers

import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetuneflow.contract.settings import configure  # noqa: E402
from finetuneflow.contract.errors import UserError, run_cli  # noqa: E402
from finetuneflow.contract.io import atomic_write_json  # noqa: E402
from finetuneflow.contract.paths import resolve  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def start_server(model: str, micro_batching: bool, cfg, log_path: Path) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, str(REPO / "serve_api.py"), f"--model={model}", "--port=0", "--host=127.0.0.1",
            f"--micro_batching={micro_batching}", f"--batch_size={cfg.BATCH_SIZE}",
            f"--batch_wait_ms={cfg.BATCH_WAIT_MS}", f"--max_new_tokens={cfg.MAX_NEW_TOKENS}",
            f"--max_chars={cfg.MAX_CHARS}", "--long_input=truncate"]
    env = {k: v for k, v in os.environ.items() if k != "FTF_API_TOKEN"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if process.poll() is not None:
            raise UserError(f"serve_api.py exited {process.returncode}: {log_path.read_text()[-500:]}")
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", log_path.read_text())
        if found:
            try:
                if httpx.get(f"{found.group(1)}/health", timeout=5).status_code == 200:
                    return process, found.group(1)
            except httpx.TransportError:
                pass
        time.sleep(0.3)
    process.terminate()
    raise UserError(f"serve_api.py did not start in 10 minutes: {log_path.read_text()[-500:]}")


async def load_test(url: str, dialogues: list[str], requests: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies, summaries = [0.0] * requests, [""] * requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one(i: int):
            async with gate:
                start = time.perf_counter()
                response = await client.post("/summarize", json={"dialogue": dialogues[i % len(dialogues)]})
                latencies[i] = time.perf_counter() - start
                response.raise_for_status()
                summaries[i] = response.json()["summary"]
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        total = time.perf_counter() - start
        batching = (await client.get("/info")).json()["batching"]
    ordered = sorted(latencies)
    return {"requests_per_s": round(requests / total, 3), "seconds": round(total, 2),
            "p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000, 1),
            "batches": batching["batches"], "largest_batch": batching["largest_batch"], "summaries": summaries}


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    dataset = resolve(cfg.DATASET) if resolve(cfg.DATASET).is_file() else REPO / cfg.DATASET   # bundled samples
    if not dataset.is_file():
        raise UserError(f"DATASET not found: {cfg.DATASET}")
    dialogues = [json.loads(line)["dialogue"] for line in dataset.read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    dialogues = [d for d in dialogues if len(d) <= cfg.MAX_CHARS]
    if not dialogues:
        raise UserError(f"{cfg.DATASET}: no dialogue of at most MAX_CHARS={cfg.MAX_CHARS} characters")
    with tempfile.TemporaryDirectory() as scratch:
        model = cfg.MODEL
        if not model:
            from finetuneflow.model.tiny import build_tiny_llama
            model = str(build_tiny_llama(scratch))
        results = {}
        for name, enabled in (("one request at a time", False), ("micro-batching", True)):
            process, url = start_server(str(resolve(model)), enabled, cfg, Path(scratch) / f"{enabled}.log")
            try:
                asyncio.run(load_test(url, dialogues, min(4, cfg.REQUESTS), 1))       # warm-up
                results[name] = asyncio.run(load_test(url, dialogues, cfg.REQUESTS, cfg.CONCURRENCY))
            finally:
                process.terminate()
                process.wait(timeout=60)
    off, on = results["one request at a time"], results["micro-batching"]
    same = sum(a == b for a, b in zip(off.pop("summaries"), on.pop("summaries")))
    print(f"model {model if cfg.MODEL else 'tiny Llama'}; {cfg.REQUESTS} requests, concurrency {cfg.CONCURRENCY}, "
          f"{cfg.MAX_NEW_TOKENS} new tokens, batch size {cfg.BATCH_SIZE}, wait {cfg.BATCH_WAIT_MS} ms; "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'mode':24} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9} {'batches':>8} {'largest':>8}")
    for name, row in results.items():
        print(f"{name:24} {row['requests_per_s']:8.2f} {row['p50_ms']:9.0f} {row['p95_ms']:9.0f} "
              f"{row['batches']:8d} {row['largest_batch']:8d}")
    ratios = {"throughput_x": round(on["requests_per_s"] / off["requests_per_s"], 2),
              "p50_latency_x": round(off["p50_ms"] / on["p50_ms"], 2),
              "p95_latency_x": round(off["p95_ms"] / on["p95_ms"], 2)}
    print(f"micro-batching: {ratios['throughput_x']}x requests/s, p50 latency {ratios['p50_latency_x']}x lower, "
          f"p95 {ratios['p95_latency_x']}x lower; identical summaries {same}/{cfg.REQUESTS}")
    record = {"model": cfg.MODEL or "tiny-llama", "settings": dict(cfg), "results": results, "ratios": ratios,
              "identical_summaries": same}
    if cfg.OUTPUT_JSON:
        atomic_write_json(resolve(cfg.OUTPUT_JSON), record)
    return record


if __name__ == "__main__":
    run_cli(main)
