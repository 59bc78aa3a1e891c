"""Benchmark: serve_api.py one request at a time vs micro-batched vs streamed, same model, same
requests, one run, side by side.

Reads:  MODEL (a model/adapter folder; "" builds the tiny Llama), DATASET (dialogues to send)
Writes: stdout (req/s, p50/p95 latency, p50/p95 time to first token of each mode, and the ratios,
        with the machine named); OUTPUT_JSON when set

Run as:
    python benchmarks/bench_serving.py                                  # tiny model, seconds
    python benchmarks/bench_serving.py --model=ft_outputs/base_smollm2 --requests=48 --concurrency=16
Each mode starts the real service (uvicorn on 127.0.0.1, a free port) as a subprocess, warms it
up, then sends REQUESTS single-dialogue requests with CONCURRENCY in flight:

* single:    MICRO_BATCHING=False, POST /summarize: every request is generated alone;
* batched:   micro-batching on, POST /summarize: concurrent requests share an engine batch;
* streaming: micro-batching on, POST /v1/chat/completions with stream=true: time to first token
             is the time to the first chunk that carries text.

For the non-streaming modes the first token arrives with the whole answer, so their time to
first token is their latency. Summaries of the three modes are compared (greedy: identical).
"""
MODEL = ""                             # model, merged or adapter folder; "" = tiny Llama built in a temp folder
DATASET = "data/samples/dialogues.jsonl"  # .jsonl with a "dialogue" field; requests cycle through it
MAX_CHARS = 1500                       # [int >= 1] dialogues longer than this are skipped (keeps requests comparable)
REQUESTS = 64                          # [int >= 1] requests per mode
CONCURRENCY = 16                       # [int >= 1] requests in flight at once
MAX_NEW_TOKENS = 16                    # [int >= 1] tokens per summary (same in every mode)
BATCH_SIZE = 8                         # [int >= 1] micro-batch size of the service
BATCH_WAIT_MS = 10.0                   # [0 <= float <= 10000] micro-batch collection window (ms)
DEVICE = None                          # [str | None] the server's device; None: cuda when available, else cpu
OUTPUT_JSON = ""                       # optional path for the numbers

import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from finetuneflow.contract.errors import UserError, run_cli  # noqa: E402
from finetuneflow.contract.io import atomic_write_json  # noqa: E402
from finetuneflow.contract.paths import resolve  # noqa: E402
from finetuneflow.contract.settings import configure  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODES = {"single": False, "batched": True, "streaming": True}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = f"{names[0]} x {len(names)}" if names else cpu
    except OSError:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            return f"{cpu}; GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{cpu}; no GPU"


def start_server(model: str, micro_batching: bool, cfg, log_path: Path) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, str(REPO / "serve_api.py"), f"--model={model}", "--port=0", "--host=127.0.0.1",
            f"--micro_batching={micro_batching}", f"--batch_size={cfg.BATCH_SIZE}",
            f"--batch_wait_ms={cfg.BATCH_WAIT_MS}", f"--max_new_tokens={cfg.MAX_NEW_TOKENS}",
            f"--max_chars={cfg.MAX_CHARS}", "--long_input=truncate", "--access_log=false",
            f"--max_pending={max(1024, cfg.REQUESTS)}", "--client_pending_tokens=100000000",
            "--request_timeout_s=3600", *([f"--device={cfg.DEVICE}"] if cfg.DEVICE else [])]
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


async def one_request(client: httpx.AsyncClient, mode: str, model_id: str, dialogue: str) -> tuple[float, str]:
    """(seconds to the first text, summary)."""
    start = time.perf_counter()
    if mode != "streaming":
        response = await client.post("/summarize", json={"dialogue": dialogue})
        response.raise_for_status()
        return time.perf_counter() - start, response.json()["summary"]
    first, text = None, []
    body = {"model": model_id, "stream": True, "messages": [{"role": "user", "content": dialogue}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            content = (chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None)
            if content:
                first = first if first is not None else time.perf_counter() - start
                text.append(content)
    return first if first is not None else time.perf_counter() - start, "".join(text)


async def load_test(url: str, mode: str, dialogues: list[str], requests: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies, firsts, summaries = [0.0] * requests, [0.0] * requests, [""] * requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        model_id = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def one(i: int):
            async with gate:
                start = time.perf_counter()
                firsts[i], summaries[i] = await one_request(client, mode, model_id, dialogues[i % len(dialogues)])
                latencies[i] = time.perf_counter() - start
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        total = time.perf_counter() - start
        batching = (await client.get("/info")).json()["batching"]

    def pct(values, q):
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)
    return {"requests_per_s": round(requests / total, 3), "seconds": round(total, 2),
            "p50_ms": round(statistics.median(latencies) * 1000, 1), "p95_ms": pct(latencies, 0.95),
            "ttft_p50_ms": round(statistics.median(firsts) * 1000, 1), "ttft_p95_ms": pct(firsts, 0.95),
            "batches": batching["batches"], "largest_batch": batching["largest_batch"], "summaries": summaries}


def report(cfg, model_name: str, results: dict, where: str) -> dict:
    print(f"machine: {where}")
    print(f"model {model_name}; {cfg.REQUESTS} requests, concurrency {cfg.CONCURRENCY}, {cfg.MAX_NEW_TOKENS} new "
          f"tokens, batch size {cfg.BATCH_SIZE}, wait {cfg.BATCH_WAIT_MS} ms; torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'mode':10} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'batches':>8} "
          f"{'largest':>8}")
    for name, row in results.items():
        print(f"{name:10} {row['requests_per_s']:8.2f} {row['p50_ms']:9.0f} {row['p95_ms']:9.0f} "
              f"{row['ttft_p50_ms']:9.0f} {row['ttft_p95_ms']:9.0f} {row['batches']:8d} {row['largest_batch']:8d}")
    single, batched, streaming = results["single"], results["batched"], results["streaming"]
    ratios = {"batched_throughput_x": round(batched["requests_per_s"] / single["requests_per_s"], 2),
              "batched_p50_latency_x": round(single["p50_ms"] / batched["p50_ms"], 2),
              "batched_p95_latency_x": round(single["p95_ms"] / batched["p95_ms"], 2),
              "streaming_throughput_x": round(streaming["requests_per_s"] / single["requests_per_s"], 2),
              "streaming_ttft_p50_x": round(single["ttft_p50_ms"] / streaming["ttft_p50_ms"], 2)}
    texts = {name: row.pop("summaries") for name, row in results.items()}
    same = {name: sum(a == b for a, b in zip(texts["single"], texts[name])) for name in ("batched", "streaming")}
    print(f"micro-batching: {ratios['batched_throughput_x']}x requests/s, p50 latency "
          f"{ratios['batched_p50_latency_x']}x lower, p95 {ratios['batched_p95_latency_x']}x lower; streaming: "
          f"{ratios['streaming_throughput_x']}x requests/s, time to first token p50 {ratios['streaming_ttft_p50_x']}x "
          f"lower than single; identical summaries batched {same['batched']}/{cfg.REQUESTS}, streamed "
          f"{same['streaming']}/{cfg.REQUESTS}")
    return {"machine": where, "model": model_name, "settings": dict(cfg), "results": results, "ratios": ratios,
            "identical_summaries": same}


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
        for mode, micro_batching in MODES.items():
            process, url = start_server(str(resolve(model)), micro_batching, cfg, Path(scratch) / f"{mode}.log")
            try:
                asyncio.run(load_test(url, mode, dialogues, min(4, cfg.REQUESTS), 1))       # warm-up
                results[mode] = asyncio.run(load_test(url, mode, dialogues, cfg.REQUESTS, cfg.CONCURRENCY))
            finally:
                process.terminate()
                process.wait(timeout=60)
    record = report(cfg, model if cfg.MODEL else "tiny Llama", results, machine())
    if cfg.OUTPUT_JSON:
        atomic_write_json(resolve(cfg.OUTPUT_JSON), record)
    return record


if __name__ == "__main__":
    run_cli(main)
