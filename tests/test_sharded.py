"""Sharded evaluation and inference: `accelerate launch --multi_gpu --num_processes 2` on CPU
processes over gloo writes ONE predictions file identical to a one-process run, written by the main
process only; the plan deals whole batches so every row is generated in the same batch."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import OFFLINE_ENV, REPO, SAMPLES, files_under, run_stage

from finetuneflow.engine.generation import GenerationResult
from finetuneflow.engine.sharding import Shard, merge_results, shard_indices

DATA = [f"--dataset={SAMPLES}", "--split=all", "--n_samples=0"]


def batches(lengths, indices, size):
    order = sorted(indices, key=lambda i: -lengths[i])
    return [order[i:i + size] for i in range(0, len(order), size)]


@pytest.mark.parametrize("world,size", [(2, 8), (2, 3), (3, 2), (4, 5), (2, 1)])
def test_each_process_gets_whole_batches_of_the_one_process_plan(world, size):
    lengths = [(i * 37) % 23 for i in range(41)]      # many ties: the order must stay stable
    shares = [shard_indices(lengths, size, Shard(rank, world)) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(41))   # every row once
    alone = batches(lengths, range(41), size)
    # each process re-sorts its rows into batches that are exactly batches of the one-process plan
    assert sorted(b for share in shares for b in batches(lengths, share, size)) == sorted(alone)
    counts = [len(batches(lengths, share, size)) for share in shares]
    assert max(counts) - min(counts) <= 1
    assert shard_indices(lengths, size, Shard()) == list(range(41))


def test_snake_order_shares_long_and_short_batches():
    lengths = list(range(80, 0, -1))   # batch k holds the k-th longest rows
    first, second = (shard_indices(lengths, 10, Shard(rank, 2)) for rank in (0, 1))
    assert first[:10] == list(range(10)) and second[:10] == list(range(10, 20))
    assert abs(sum(lengths[i] for i in first) - sum(lengths[i] for i in second)) <= 10 * 10


def test_merged_result_restores_the_callers_order():
    def part(indices):
        return indices, GenerationResult([f"s{i}" for i in indices], 10 * len(indices), 2.0 + len(indices),
                                         [i % 2 == 0 for i in indices], {"num_beams": 1}, 4, 64,
                                         ["stop"] * len(indices), [i for i in indices], [1] * len(indices),
                                         {"prefix_cache": len(indices)})
    merged = merge_results([part([0, 3, 4]), part([1, 2])], 5)
    assert merged.summaries == ["s0", "s1", "s2", "s3", "s4"] and merged.truncated == [True, False, True, False, True]
    assert merged.input_tokens == [0, 1, 2, 3, 4] and merged.generated_tokens == 50
    assert merged.seconds == 5.0 and merged.speedups == {"prefix_cache": 5} and merged.batch_size == 4
    assert merge_results([part([0, 3, 4]), part([1, 2])], 5, seconds=1.5).seconds == 1.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args: str, root, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N <script> ...` as a user runs it (CPU: gloo)."""
    env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(root), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), str(REPO / script), *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("family,batch", [("llama", 2), ("bart", 3)])
def test_sharded_eval_writes_one_csv_identical_to_one_process(family, batch, tiny_models, tmp_path):
    model = f"--model={tiny_models[family]}"
    settings = [*DATA, f"--batch_size={batch}", "--max_new_tokens=10", "--max_input_length=256"]
    run_stage("eval_bart_lora.py", model, *settings, "--tag=one", root=tmp_path, env={"OMP_NUM_THREADS": "1"})
    result = launch("eval_bart_lora.py", model, *settings, "--tag=two", root=tmp_path)
    metrics = tmp_path / "metrics"
    assert files_under(metrics) == {f"{tag}_{kind}" for tag in ("one", "two")
                                    for kind in ("predictions.csv", "eval.json", "run_config.json")}
    assert (metrics / "two_predictions.csv").read_bytes() == (metrics / "one_predictions.csv").read_bytes()
    assert result.stdout.count("ROUGE-1") == 1 and "2 processes" in result.stdout   # only the main process reports
    import json
    one, two = (json.loads((metrics / f"{tag}_eval.json").read_text()) for tag in ("one", "two"))
    assert two["model"]["processes"] == 2 and one["model"]["processes"] == 1
    assert two["averages"] == one["averages"] and two["counts"] == one["counts"]
    assert two["timing"]["generated_tokens"] == one["timing"]["generated_tokens"]


@pytest.mark.slow
@pytest.mark.e2e
def test_sharded_inference_writes_every_row_in_input_order(tiny_models, tmp_path):
    model = f"--model={tiny_models['llama']}"
    settings = [f"--input_file={SAMPLES}", "--batch_size=2", "--max_new_tokens=8", "--long_input=truncate"]
    run_stage("inference_bart_lora.py", model, *settings, "--output_file=outputs/one.jsonl", root=tmp_path,
              env={"OMP_NUM_THREADS": "1"})
    launch("inference_bart_lora.py", model, *settings, "--output_file=outputs/two.jsonl", root=tmp_path)
    one, two = ((tmp_path / "outputs" / f"{n}.jsonl").read_text() for n in ("one", "two"))
    assert one == two and one.count("\n") == len(SAMPLES.read_text().strip().splitlines())


@pytest.mark.slow
@pytest.mark.e2e
def test_sharded_mbr_eval_equals_one_process(tiny_models, tmp_path):
    """DECODING=mbr: a row's samples are seeded from (MBR_SEED, its prompt), so two gloo processes
    write the CSV one process writes, byte for byte."""
    settings = [f"--model={tiny_models['llama']}", *DATA, "--batch_size=2", "--max_new_tokens=8",
                "--max_input_length=256", "--decoding=mbr", "--mbr_samples=2"]
    run_stage("eval_bart_lora.py", *settings, "--tag=one", root=tmp_path, env={"OMP_NUM_THREADS": "1"})
    launch("eval_bart_lora.py", *settings, "--tag=two", root=tmp_path)
    metrics = tmp_path / "metrics"
    assert (metrics / "two_predictions.csv").read_bytes() == (metrics / "one_predictions.csv").read_bytes()
    import json
    one, two = (json.loads((metrics / f"{tag}_eval.json").read_text())["mbr"] for tag in ("one", "two"))
    assert (one["dropped_unfaithful"], one["selections"]) == (two["dropped_unfaithful"], two["selections"])
