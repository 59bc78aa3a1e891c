"""llama.cpp's importance matrix for the low-bit GGUF types, computed on text like the user's.

A k-quant or iq type rounds each weight row; llama.cpp's importance matrix (per input column of
each matrix, the mean squared activation seen on sample text) tells the quantizer which columns to
keep precise. IMATRIX settles where it comes from:

* `auto`: computed here with llama.cpp's own `llama-imatrix` (ship/llama_tools.py) from the
  16/32-bit GGUF the quantizer starts from, on the model's TRAINING dialogues as the model saw them:
  the chat template, the instruction and the dialogue, then the training summary and the end token
  (`examples_text`), with special tokens parsed (`--parse-special`). The rows come from the model's
  record (its training data and split: ship/gate_rows.py `training_rows`); when that data is not
  here, the probe dataset's train split, with a note. Never the held-out rows the gate scores.
* a file: an importance matrix made elsewhere (llama-imatrix's GGUF format, or its legacy .dat);
  checked before anything is written (`check_file`): a file that is not one, or one made for a
  model of another shape, is one error line.

The record (`ImatrixInfo.as_dict`) names the file, its sha256 and, for `auto`, the source rows
(count, split, file) and the llama-imatrix command; the export publishes the file as
`<name>.imatrix.gguf` beside the GGUF files, so `--IMATRIX=<that file>` reuses it.
"""
from __future__ import annotations

import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetuneflow.contract.errors import UserError

CONTEXT = 512                  # tokens per llama-imatrix chunk
IMATRIX_MODES = ("auto",)


@dataclass
class ImatrixInfo:
    path: Path
    sha256: str
    source: str                          # "auto" (computed here) or "file"
    rows: dict = field(default_factory=dict)   # {file, split, count} of the text it was computed on
    entries: int = 0
    notes: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    seconds: float | None = None

    def as_dict(self, published: Path | None = None) -> dict:
        from finetuneflow.contract.record import portable
        return {"file": portable(published or self.path), "sha256": self.sha256, "source": self.source,
                "rows": self.rows, "entries": self.entries, "notes": self.notes,
                **({"command": self.command, "seconds": self.seconds} if self.command else {})}


# ----------------------------------------------------------------------------- reading a file

def _legacy_entries(data: bytes) -> dict[str, int]:
    """{tensor name: values} of llama-imatrix's legacy .dat format (raises ValueError when it is not one)."""
    (count,), at, out = struct.unpack_from("<i", data, 0), 4, {}
    if not 0 < count < 100000:
        raise ValueError("bad entry count")
    for _ in range(count):
        (length,) = struct.unpack_from("<i", data, at)
        if not 0 < length < 1024:
            raise ValueError("bad name length")
        name = data[at + 4:at + 4 + length].decode("utf-8")
        _, values = struct.unpack_from("<ii", data, at + 4 + length)
        at += 12 + length + 4 * values
        if values <= 0 or at > len(data):
            raise ValueError("truncated")
        out[name] = values
    return out


def read_entries(path: Path) -> tuple[str, dict[str, int]]:
    """(format, {tensor name: input columns}) of an importance matrix file; ValueError if it is none."""
    data = path.read_bytes()
    if data[:4] == b"GGUF":
        from gguf import GGUFReader
        reader = GGUFReader(str(path))
        out = {t.name[:-len(".in_sum2")]: int(t.shape[0]) for t in reader.tensors if t.name.endswith(".in_sum2")}
        if not out:
            raise ValueError("a GGUF file without importance-matrix tensors (*.in_sum2)")
        return "gguf", out
    return "dat", _legacy_entries(data)


def check_file(path_text: str, config: dict) -> ImatrixInfo:
    """An importance matrix given with IMATRIX=<file>, checked against the model's shape (config.json)."""
    from finetuneflow.contract.paths import resolve
    from finetuneflow.contract.record import sha256_file
    path = resolve(path_text)
    if not path.is_file():
        raise UserError(f"IMATRIX={path_text}: {path} does not exist; pass a file written by llama-imatrix, or "
                        f"IMATRIX=auto to compute one from the training dialogues")
    try:
        kind, entries = read_entries(path)
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"IMATRIX={path_text} is not an importance matrix written by llama-imatrix ({exc}); pass one, "
                        f"or IMATRIX=auto") from None
    hidden, layers = config.get("hidden_size"), config.get("num_hidden_layers")
    wrong = [n for n, width in entries.items() if n.endswith("attn_q.weight") and hidden and width != hidden]
    deeper = [n for n in entries if layers and n.startswith("blk.") and int(n.split(".")[1]) >= layers]
    if wrong or deeper:
        what = f"{wrong[0]} has {entries[wrong[0]]} inputs, the model {hidden}" if wrong else \
            f"{deeper[0]} is past the model's {layers} layers"
        raise UserError(f"IMATRIX={path_text} was made for another model ({what}); compute one for this model with "
                        f"IMATRIX=auto")
    return ImatrixInfo(path, sha256_file(path), "file", entries=len(entries),
                       notes=[f"given as a file ({kind} format)"])


# ----------------------------------------------------------------------------- computing one

def examples_text(tokenizer, instruction: str, rows: list[dict]) -> str:
    """Each training example as the model saw it in training: prompt, summary, end token."""
    from finetuneflow.model.prompts import PLAIN_TEMPLATE, prompt_style
    eos = tokenizer.eos_token or ""
    pieces = []
    for row in rows:
        if prompt_style(tokenizer) == "chat_template":
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"{instruction}\n\n{row['dialogue']}"}],
                                                   add_generation_prompt=True, tokenize=False)
        else:
            prompt = PLAIN_TEMPLATE.format(instruction=instruction, dialogue=row["dialogue"])
        pieces.append(prompt + row["summary"].strip() + eos)
    return "\n".join(pieces) + "\n"


def calibration_rows(source, n: int, seed: int, probe_dataset: str) -> tuple[list[dict], dict, list[str]]:
    """The model's training rows (its record's data and split), else the probe dataset's train split."""
    from finetuneflow.contract.record import portable
    from finetuneflow.ship.gate_rows import training_rows
    from finetuneflow.ship.parity import load_probes
    rows, origin, notes = training_rows(source, n, seed)
    if rows:
        return rows, origin, notes
    rows, where = load_probes(probe_dataset, n, "train", seed)
    notes.append(f"the importance matrix was computed on the train split of {portable(where)} instead")
    return rows, {"file": portable(where), "split": "train", "count": len(rows)}, notes


def compute(base_gguf: Path, out: Path, text: str, *, threads: int, log=print,
            shown: tuple[str, str] | None = None) -> tuple[list[str], float]:
    """Run llama-imatrix on `text` (a temporary file) and write `out`; (the command as the record shows
    it, with `shown` (model, output) names for the temporary files; seconds)."""
    import tempfile

    from finetuneflow.ship.llama_tools import find_tool
    program = find_tool("llama-imatrix")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as handle:
        handle.write(text)
        corpus = Path(handle.name)
    command = [str(program), "-m", str(base_gguf), "-f", str(corpus), "-o", str(out), "--parse-special",
               "-c", str(CONTEXT), "-b", str(CONTEXT), "-t", str(threads), "--no-ppl"]
    start = time.perf_counter()
    log(f"computing llama.cpp's importance matrix with llama-imatrix on {base_gguf.name} ({len(text)} characters)")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=7200)
    finally:
        corpus.unlink(missing_ok=True)
    if result.returncode != 0 or not out.is_file():
        lines = (result.stdout + result.stderr).splitlines()
        reason = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "?")
        raise UserError(f"llama-imatrix failed on {base_gguf.name}: {reason.strip()[:300]}")
    names = {str(corpus): "<training examples>", str(base_gguf): (shown or (base_gguf.name, out.name))[0],
             str(out): (shown or (base_gguf.name, out.name))[1]}
    return [Path(program).name] + [names.get(c, c) for c in command[1:]], round(time.perf_counter() - start, 1)


# ----------------------------------------------------------------------------- one export's matrix

class GGUFImatrix:
    """The importance matrix of one GGUF export (IMATRIX): checked before anything is written,
    computed (auto) from the 16/32-bit file the quantizer starts from, used by every k-quant and
    iq type of the run, and published once as `<name>.imatrix.gguf` (auto)."""

    def __init__(self):
        self.mode: str | None = None          # None | auto | file
        self.info: ImatrixInfo | None = None
        self.note: str | None = None           # why IMATRIX is not used (printed once)
        self.target_path: Path | None = None
        self._published = False

    def check(self, source, settings, quantized: list[str]) -> None:
        from finetuneflow.ship.llama_tools import find_tool, missing
        from finetuneflow.ship.quantize import IMATRIX_TYPES
        if settings.imatrix is None:
            return
        wanted = [kind for kind in quantized if kind in IMATRIX_TYPES]
        if str(settings.imatrix).strip().lower() != "auto":
            self.info, self.mode = check_file(settings.imatrix, source.config), "file"
            if wanted and find_tool("llama-quantize") is None:
                raise UserError(f"IMATRIX={settings.imatrix}: quantizing with an importance matrix needs "
                                f"{missing('llama-quantize')}")
        elif not wanted:
            self.note = "IMATRIX=auto: no type of this run uses an importance matrix (k-quants and iq types do)"
        elif find_tool("llama-imatrix") is None or find_tool("llama-quantize") is None:
            tool = "llama-imatrix" if find_tool("llama-imatrix") is None else "llama-quantize"
            self.note = f"IMATRIX=auto skipped, quantizing without an importance matrix: {missing(tool)}"
        else:
            self.mode = "auto"

    def target(self, source, folder: Path, name: str) -> None:
        from finetuneflow.contract.safety import check_output_file
        if self.mode == "auto":
            self.target_path = check_output_file(folder / f"{name}.imatrix.gguf", stage="export_gguf",
                                                 setting="OUTPUT_DIR", inputs=[source.path],
                                                 marker=folder / f"{name}.deploy_report.json")

    def prepare(self, source, settings, base_gguf: Path, stack, log) -> Path | None:
        """The matrix file the quantizer uses (computed now for auto), or None."""
        import os
        import tempfile

        from finetuneflow.contract.record import sha256_file
        from finetuneflow.model.backends.llamacpp_bindings import default_threads
        from finetuneflow.model.loading import load_tokenizer
        from finetuneflow.ship.exporter import resolve_settings
        if self.note:
            log(self.note)
            self.note = None
        if self.mode != "auto":
            return self.info.path if self.info else None
        rows, origin, notes = calibration_rows(source, settings.imatrix_rows, settings.seed, settings.probe_dataset)
        text = examples_text(load_tokenizer(str(source.path), source.family),
                             resolve_settings(source, settings).instruction, rows)
        handle, name = tempfile.mkstemp(dir=self.target_path.parent, prefix=".imatrix.", suffix=".tmp.gguf")
        os.close(handle)
        staged = Path(name)
        stack.callback(staged.unlink, missing_ok=True)
        command, seconds = compute(base_gguf, staged, text, threads=default_threads(), log=log,
                                   shown=("<the 16/32-bit GGUF of MODEL>", self.target_path.name))
        self.info = ImatrixInfo(staged, sha256_file(staged), "auto", rows=origin, entries=len(read_entries(staged)[1]),
                                notes=notes, command=command, seconds=seconds)
        log(f"importance matrix: {origin['count']} training examples of {origin['file']} ({origin['split']}), "
            f"{self.info.entries} tensors, sha256 {self.info.sha256[:12]}, {seconds} s")
        return staged

    def record(self) -> dict | None:
        if self.info is None:
            return None
        return self.info.as_dict(self.target_path if self.mode == "auto" else None)

    def publish(self) -> dict[str, str]:
        """auto: the matrix is moved into place once (with the first published type)."""
        import os

        from finetuneflow.contract.io import public_mode
        if self.mode != "auto" or self.info is None:
            return {}
        if not self._published:
            public_mode(self.info.path, is_dir=False)
            os.replace(self.info.path, self.target_path)
            self._published = True
        return {"imatrix": str(self.target_path)}
