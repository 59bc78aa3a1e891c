"""Resumable evaluation (eval_bart_lora.py): each process appends every batch it finishes to its own
part file beside the predictions CSV, `<TAG>_predictions.part-<rank>.jsonl`, so a run that crashed
or was killed (kill -9, a lost Colab session) continues after its last complete batch when the
same command runs again; the final CSV is the one an uninterrupted run writes, byte for byte.

The part file is JSON lines: a header with the run's identity (a hash of every setting that can
change a prediction, the model's files, and the rows: ids, dialogues, references) and the number
of processes, then one line per finished batch (its batch number, rows and the engine's result).
A torn last line (the process died while writing it) is dropped and its batch generated again, so
at most one batch of work is lost. A part file of another run (other settings, model, rows or
number of processes) is refused with one line, before anything is written; --OVERWRITE=True (or
deleting it) starts over. The main process deletes the part files once the CSV, the eval json and
the finished run record are written.

`FTF_EVAL_EXIT_AFTER_BATCH=k` (for tests) ends the process with os._exit right after its part file
holds k batches: a real kill point, after a real append.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.paths import resolve
from finetuneflow.engine.long_input import LongGenerationResult
from finetuneflow.engine.sharding import BatchJournal, Shard

EXIT_AFTER = "FTF_EVAL_EXIT_AFTER_BATCH"
# settings that decide where outputs go or what is logged, never what a prediction is
NOT_IDENTITY = {"TAG", "WANDB", "OUTPUT_DIR", "OVERWRITE", "ALLOW_OVERLAP"}


def part_path(predictions: Path, rank: int) -> Path:
    return predictions.with_name(f"{predictions.stem}.part-{rank}.jsonl")


def existing_parts(predictions: Path) -> list[Path]:
    return sorted(predictions.parent.glob(f"{predictions.stem}.part-*.jsonl")) if predictions.parent.is_dir() else []


def model_fingerprint(model: str) -> list:
    """The model's files (relative name, size, modification time), or its Hub id."""
    path = resolve(model)
    if not path.exists():
        return [model]
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [[str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def run_identity(config: dict, model: str, rows: list[dict]) -> str:
    """A hash of what decides the predictions: the settings, the model's files, the rows."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in config.items() if k not in NOT_IDENTITY}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(json.dumps(model_fingerprint(model)).encode())
    for row in rows:
        digest.update(json.dumps([str(row["id"]), row["dialogue"], row["summary"], row.get("references")],
                                 default=str).encode())
    return digest.hexdigest()


def read_lines(path: Path) -> tuple[list[dict], int]:
    """The complete JSON lines of a part file and the byte length they fill (a torn last line is
    left out); a damaged line before the last is an error."""
    data = path.read_bytes()
    lines, good = [], 0
    for raw in data.split(b"\n")[:-1]:              # the piece after the last newline is torn (or empty)
        try:
            lines.append(json.loads(raw))
        except ValueError:
            if good + len(raw) + 1 == len(data):    # the last line, damaged: dropped like a torn one
                break
            raise UserError(f"{path} is damaged (line {len(lines) + 1} is not JSON); delete it, or pass "
                            f"--OVERWRITE=True to start the evaluation over") from None
        good += len(raw) + 1
    return lines, good


def foreign(path: Path, identity: str, world: int) -> str | None:
    """Why the part file at `path` belongs to another run (None: it is this run's, or empty)."""
    lines, _ = read_lines(path)
    if not lines:
        return None
    header = lines[0]
    if header.get("identity") != identity:
        return "another evaluation (other settings, model or rows)"
    if header.get("world") != world:
        return f"a run in {header.get('world')} processes (this one runs {world})"
    return None


def check_parts(predictions: Path, identity: str, shard: Shard, overwrite: bool) -> None:
    """Before anything is written: every part file beside `predictions` must be this run's; with
    `overwrite` this process deletes its own (the main process also those of ranks past the world)."""
    for path in existing_parts(predictions):
        rank = path.name.rsplit(".part-", 1)[1].split(".")[0]
        mine = rank == str(shard.rank) or (shard.main and (not rank.isdigit() or int(rank) >= shard.world))
        if overwrite:
            if mine:
                path.unlink(missing_ok=True)
            continue
        why = foreign(path, identity, shard.world)
        if why:
            raise UserError(f"{path} holds the predictions of {why}; pass --OVERWRITE=True to discard it and "
                            f"start again, or delete it")


def remove_parts(predictions: Path) -> None:
    """Once the predictions CSV is written: the part files are done with."""
    for path in existing_parts(predictions):
        path.unlink(missing_ok=True)


class PartFile(BatchJournal):
    """This process's part file: the batches an earlier run of the same command finished, and an
    append (flushed to disk) for each batch this run finishes."""

    def __init__(self, predictions: Path, identity: str, shard: Shard):
        self.path, self.identity, self.shard = part_path(predictions, shard.rank), identity, shard
        self.done: dict[int, tuple[list[int], dict]] = {}
        self.reused = 0
        good = 0
        if self.path.exists():
            lines, good = read_lines(self.path)
            for line in lines[1:]:
                self.done[line["batch"]] = (line["rows"], line["result"])
        if not good:          # no file, or not even a complete header: start it
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"identity": identity, "rank": shard.rank, "world": shard.world}) + "\n",
                                 encoding="utf-8")
        elif good < self.path.stat().st_size:
            os.truncate(self.path, good)      # the torn last line goes; its batch runs again

    def get(self, number: int, rows: list[int]) -> LongGenerationResult | None:
        if number not in self.done:
            return None
        stored_rows, result = self.done[number]
        if stored_rows != rows:
            raise UserError(f"{self.path}: batch {number} holds other rows than this run's; delete it, or pass "
                            f"--OVERWRITE=True to start the evaluation over")
        self.reused += 1
        return LongGenerationResult(**result)

    def record(self, number: int, rows: list[int], result) -> None:
        line = json.dumps({"batch": number, "rows": rows, "result": asdict(result)}, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.done[number] = (rows, {})
        exit_after = os.environ.get(EXIT_AFTER, "")
        if exit_after.isdigit() and len(self.done) == int(exit_after):
            os._exit(75)      # tests: a kill right after a complete append
