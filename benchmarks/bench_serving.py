"""Benchmark: serve_api.py one request at a time vs micro-batched vs token-streamed, with the
faithfulness checks on and off, same model, same requests, one run, side by side.

Reads:  MODEL (a model/adapter folder; "" builds the tiny Llama), DATASET (dialogues to send)
Writes: stdout (req/s, p50/p95 latency, p50/p95 time to first token of each mode, the ratios and
        the issue-22 goals, with the machine named); OUTPUT_JSON when set

Run as:
    python benchmarks/bench_serving.py                                  # tiny model, seconds
    python benchmarks/bench_serving.py --model=ft_outputs/base_smollm2 --dataset=../shared/data/dialogsum_dev500.jsonl \
        --requests=32 --concurrency=8 --max_new_tokens=64 --output_json=benchmarks/serving_streaming.json
Each mode starts the real service (uvicorn on 127.0.0.1, a free port) as a subprocess, warms it
up, then sends REQUESTS single-dialogue requests with CONCURRENCY in flight:

* single:     MICRO_BATCHING=False, POST /summarize: every request is generated alone;
* batched:    micro-batching on, POST /summarize (CHECKS on, the default);
* streaming:  micro-batching on, POST /v1/chat/completions with stream=true: time to first token
              is the time to the first chunk that carries text (tokens stream inside the batch);
* checks_off: as batched with CHECKS=False: what the faithfulness checks cost.

For the non-streaming modes the first token arrives with the whole answer, so their time to
first token is their latency. Summaries of every mode are compared (greedy: identical). Goals
(issue 22): streamed TTFT p50 <= 15% of the non-streamed (batched) p50 latency; streamed req/s
within 10% of batched; the checks add <= 5% to the latency (measured two ways: batched vs
checks_off p50, and the checks' own seconds each response reports in ftf.checks).
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
MODES = "single,batched,streaming,checks_off"  # which modes to run (comma-separated; goals need the last three)

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
# mode -> (micro-batching, checks)
MODE_SETTINGS = {"single": (False, True), "batched": (True, True), "streaming": (True, True),
                 "checks_off": (True, False)}
GOALS = {"ttft_share_max": 0.15, "throughput_ratio_min": 0.90, "checks_cost_max": 0.05}


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


def start_server(model: str, mode: str, cfg, log_path: Path) -> tuple[subprocess.Popen, str]:
    micro_batching, checks = MODE_SETTINGS[mode]
    args = [sys.executable, str(REPO / "serve_api.py"), f"--model={model}", "--port=0", "--host=127.0.0.1",
            f"--micro_batching={micro_batching}", f"--checks={checks}", f"--batch_size={cfg.BATCH_SIZE}",
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
                info = httpx.get(f"{found.group(1)}/info", timeout=5).json()
                if "loading" not in info["checks"]["encoder"]:       # the checks' encoder is ready
                    return process, found.group(1)
            except (httpx.TransportError, ValueError, KeyError):
                pass
        time.sleep(0.3)
    process.terminate()
    raise UserError(f"serve_api.py did not start in 10 minutes: {log_path.read_text()[-500:]}")


async def one_request(client: httpx.AsyncClient, mode: str, model_id: str,
                      dialogue: str) -> tuple[float, str, float]:
    """(seconds to the first text, summary, seconds its checks took)."""
    start = time.perf_counter()
    if mode != "streaming":
        response = await client.post("/summarize", json={"dialogue": dialogue})
        response.raise_for_status()
        checks = response.json()["ftf"]["checks"][0] or {}
        return time.perf_counter() - start, response.json()["summary"], checks.get("seconds", 0.0)
    first, text, checks = None, [], 0.0
    body = {"model": model_id, "stream": True, "messages": [{"role": "user", "content": dialogue}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            content = (chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None)
            checks = ((chunk.get("ftf") or {}).get("checks") or {}).get("seconds", checks)
            if content:
                first = first if first is not None else time.perf_counter() - start
                text.append(content)
    return first if first is not None else time.perf_counter() - start, "".join(text), checks


async def load_test(url: str, mode: str, dialogues: list[str], requests: int, concurrency: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    latencies, firsts, summaries, checks = [0.0] * requests, [0.0] * requests, [""] * requests, [0.0] * requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        model_id = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def one(i: int):
            async with gate:
                start = time.perf_counter()
                firsts[i], summaries[i], checks[i] = await one_request(client, mode, model_id,
                                                                       dialogues[i % len(dialogues)])
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
            "checks_mean_ms": round(statistics.mean(checks) * 1000, 2),
            "mean_ms": round(statistics.mean(latencies) * 1000, 1),
            "batches": batching["batches"], "largest_batch": batching["largest_batch"], "summaries": summaries}


def ratios_of(results: dict) -> dict:
    """Side-by-side ratios of the modes that ran."""
    out = {}
    single, batched = results.get("single"), results.get("batched")
    streaming, off = results.get("streaming"), results.get("checks_off")
    if single and batched:
        out.update(batched_throughput_x=round(batched["requests_per_s"] / single["requests_per_s"], 2),
                   batched_p50_latency_x=round(single["p50_ms"] / batched["p50_ms"], 2),
                   batched_p95_latency_x=round(single["p95_ms"] / batched["p95_ms"], 2))
    if single and streaming:
        out.update(streaming_throughput_x=round(streaming["requests_per_s"] / single["requests_per_s"], 2),
                   streaming_ttft_p50_x=round(single["ttft_p50_ms"] / streaming["ttft_p50_ms"], 2))
    if batched and streaming:
        out.update(ttft_share=round(streaming["ttft_p50_ms"] / batched["p50_ms"], 3),
                   throughput_ratio=round(streaming["requests_per_s"] / batched["requests_per_s"], 3))
    if batched and off:
        out.update(checks_cost_p50=round(batched["p50_ms"] / off["p50_ms"] - 1, 3),
                   checks_cost_own=round(batched["checks_mean_ms"] / batched["mean_ms"], 4))
    return out


def goals_of(ratios: dict) -> dict:
    """Each issue-22 goal the run measured: its value, its bound, met or not."""
    goals = {}
    if "ttft_share" in ratios:
        goals["ttft_p50_share_of_latency"] = (ratios["ttft_share"], f"<= {GOALS['ttft_share_max']}",
                                              ratios["ttft_share"] <= GOALS["ttft_share_max"])
        goals["streamed_vs_batched_req_s"] = (ratios["throughput_ratio"], f">= {GOALS['throughput_ratio_min']}",
                                              ratios["throughput_ratio"] >= GOALS["throughput_ratio_min"])
    if "checks_cost_own" in ratios:
        goals["checks_latency_cost"] = (ratios["checks_cost_own"], f"<= {GOALS['checks_cost_max']}",
                                        ratios["checks_cost_own"] <= GOALS["checks_cost_max"])
    return {name: {"value": v, "goal": g, "met": m} for name, (v, g, m) in goals.items()}


def report(cfg, model_name: str, results: dict, where: str) -> dict:
    print(f"machine: {where}")
    print(f"model {model_name}; {cfg.REQUESTS} requests, concurrency {cfg.CONCURRENCY}, {cfg.MAX_NEW_TOKENS} new "
          f"tokens, batch size {cfg.BATCH_SIZE}, wait {cfg.BATCH_WAIT_MS} ms; torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'mode':10} {'req/s':>8} {'p50 ms':>9} {'p95 ms':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'checks ms':>9} "
          f"{'batches':>8} {'largest':>8}")
    for name, row in results.items():
        print(f"{name:10} {row['requests_per_s']:8.2f} {row['p50_ms']:9.0f} {row['p95_ms']:9.0f} "
              f"{row['ttft_p50_ms']:9.0f} {row['ttft_p95_ms']:9.0f} {row['checks_mean_ms']:9.1f} "
              f"{row['batches']:8d} {row['largest_batch']:8d}")
    ratios = ratios_of(results)
    texts = {name: row.pop("summaries") for name, row in results.items()}
    first = next(iter(texts))
    same = {name: sum(a == b for a, b in zip(texts[first], texts[name])) for name in texts if name != first}
    goals = goals_of(ratios)
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    print(f"identical summaries vs {first}: " + ", ".join(f"{k} {v}/{cfg.REQUESTS}" for k, v in same.items()))
    for name, goal in goals.items():
        print(f"goal {name}: {goal['value']} (goal {goal['goal']}): {'met' if goal['met'] else 'NOT met'}")
    return {"machine": where, "model": model_name, "settings": dict(cfg), "results": results, "ratios": ratios,
            "goals": goals, "identical_summaries": same}


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    dataset = resolve(cfg.DATASET) if resolve(cfg.DATASET).is_file() else REPO / cfg.DATASET   # bundled samples
    if not dataset.is_file():
        raise UserError(f"DATASET not found: {cfg.DATASET}")
    dialogues = [json.loads(line)["dialogue"] for line in dataset.read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    dialogues = [d for d in dialogues if len(d) <= cfg.MAX_CHARS]
    modes = [m.strip() for m in cfg.MODES.split(",") if m.strip()]
    if not modes or any(m not in MODE_SETTINGS for m in modes):
        raise UserError(f"--MODES={cfg.MODES}: use a comma-separated list of {', '.join(MODE_SETTINGS)}")
    if not dialogues:
        raise UserError(f"{cfg.DATASET}: no dialogue of at most MAX_CHARS={cfg.MAX_CHARS} characters")
    with tempfile.TemporaryDirectory() as scratch:
        model = cfg.MODEL
        if not model:
            from finetuneflow.model.tiny import build_tiny_llama
            model = str(build_tiny_llama(scratch))
        results = {}
        for mode in modes:
            process, url = start_server(str(resolve(model)), mode, cfg, Path(scratch) / f"{mode}.log")
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
