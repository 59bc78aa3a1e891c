"""The run record: the one typed hand-off between stages.

Every stage writes a `RunRecord` beside its outputs (`run_config.json` inside an output folder, or
`<name>.run_config.json` beside a file in a shared folder such as metrics/) and later stages read it
back with `read_record`. It holds the resolved settings, library versions, the git commit, a
sha256 of every input, and what later stages need to know:

* `family`, the prompt (`instruction`, `prompt_style`, `seq2seq_prefix`), `generation`, lengths,
  `load_in_4bit`, `dtype`;
* `lineage`: base model -> adapter -> merged -> cleaned -> exported (and a GGUF it was imported from);
* `split`: the data it was trained on (source, seed, fractions, row counts) with a fingerprint of
  every training dialogue, so evaluation can refuse to score rows the model was trained on.

Paths in a record are relative to the project root (FTF_ROOT) when they lie under it, else absolute
(`portable`); `read_record` also reads older records' paths relative to the code folder.
First-wave records (`schema_version` absent) load too: their flat keys map onto the same fields.

`inherit_into(cfg, names)` is the one "a setting left at None comes from the previous stage" rule.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from finetuneflow.contract.decoding import GenerationSettings, coupled_skips
from finetuneflow.contract.io import atomic_write_json, read_json_object
from finetuneflow.contract.paths import CODE_ROOT, ROOT, resolve

RECORD_FILE = "run_config.json"
SCHEMA_VERSION = 2
TRACKED_LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "rouge-score",
                     "bert-score", "sacrebleu", "gguf", "ctranslate2", "llama-cpp-python")


# ----------------------------------------------------------------------------- helpers

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(text: str) -> str:
    """A short, whitespace-insensitive fingerprint of a dialogue (for train/eval overlap checks)."""
    return hashlib.sha1(" ".join(str(text).split()).encode("utf-8")).hexdigest()[:16]


def ids_digest(ids: Iterable) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode("utf-8")).hexdigest()[:16]


def portable(path: str | Path | None) -> str | None:
    """A path as a record stores it, the way `resolve` reads it back: relative to the project root
    (FTF_ROOT) when it lies under it, else absolute. Hub ids and relative paths are kept as given,
    except a relative path found only under the code folder (the bundled samples with another
    FTF_ROOT), which is stored absolute."""
    if path is None:
        return None
    text = str(path)
    p = Path(text).expanduser()
    if not p.is_absolute():
        if (ROOT / p).exists() or not (CODE_ROOT / p).exists():
            return text
        p = CODE_ROOT / p
    for candidate in (Path(os.path.normpath(p)), p.resolve()):
        if candidate.is_relative_to(ROOT):
            return str(candidate.relative_to(ROOT))
    return str(p)


def from_code_folder(path: str | None) -> str | None:
    """A path read from a record: records written before `portable` kept to FTF_ROOT stored a path
    under the code folder relative to it; such a path (missing under the project root, present
    under the code folder) comes back absolute. Every other value is returned unchanged."""
    if not path or Path(path).expanduser().is_absolute() or resolve(path).exists():
        return path
    return str(CODE_ROOT / path) if (CODE_ROOT / path).exists() else path


def describe_inputs(paths: Iterable[str | Path | None]) -> dict:
    """{path: sha256} for local files, {folder: {file: sha256}} for folders; Hub ids as-is."""
    described: dict[str, Any] = {}
    for item in paths:
        if item is None:
            continue
        path = resolve(item)
        key = portable(item) if path.exists() else str(item)   # a relative path stays as given
        if path.is_file():
            described[key] = sha256_file(path)
        elif path.is_dir():
            described[key] = {str(p.relative_to(path)): sha256_file(p)
                              for p in sorted(path.rglob("*")) if p.is_file()
                              and not any(part.startswith("checkpoint-") for part in p.parts)}
        else:
            described[key] = "hub-or-remote"
    return described


def library_versions() -> dict:
    versions = {"python": sys.version.split()[0]}
    for lib in TRACKED_LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CODE_ROOT, capture_output=True, text=True, timeout=10)
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the record

@dataclass
class Lineage:
    base_model: str | None = None       # Hub id or folder the weights start from
    adapter: str | None = None          # the LoRA adapter folder (train_bart_lora.py)
    adapter_sha256: str | None = None
    merged_from: str | None = None      # the adapter a merged model was made from
    cleaned_from: str | None = None     # the merged folder a cleaned model was made from
    exported_from: str | None = None    # the model folder an export was made from
    imported_from: str | None = None    # the .gguf a model folder was imported from

    def chain(self) -> list[str]:
        """The model folders this one descends from, nearest first."""
        return [p for p in (self.exported_from, self.cleaned_from, self.merged_from, self.adapter, self.base_model,
                            self.imported_from) if p]


@dataclass
class Split:
    """The data a model was trained on, precise enough to keep evaluation off its training rows."""
    source: str | None = None
    hub_config: str | None = None
    columns: dict = field(default_factory=dict)
    normalize: bool = False
    seed: int | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    made_from_single_file: bool | None = None
    train_samples: int | None = None            # rows asked for (0 = all)
    val_samples: int | None = None
    train_rows: int | None = None               # rows used
    validation_rows: int | None = None
    dropped_empty_rows: dict = field(default_factory=dict)
    train_fingerprints: list[str] = field(default_factory=list)   # fingerprint() of every training dialogue
    validation_ids: str | None = None           # ids_digest of the validation rows


_FLAT = ("family", "instruction", "prompt_style", "seq2seq_prefix", "max_input_length", "max_target_length",
         "load_in_4bit", "dtype", "backend")
_KNOWN = {"stage", "schema_version", "created", "config", "config_file", "inputs", "versions", "git_commit",
          "generation", "lineage", "split", *_FLAT}


@dataclass
class RunRecord:
    stage: str
    config: dict = field(default_factory=dict)        # the resolved settings
    family: str | None = None                         # "seq2seq" | "causal"
    instruction: str | None = None
    prompt_style: str | None = None                   # "chat_template" | "plain" | "seq2seq"
    seq2seq_prefix: str | None = None
    max_input_length: int | None = None
    max_target_length: int | None = None
    load_in_4bit: bool | None = None
    dtype: str | None = None
    backend: str | None = None                        # "transformers" | "ctranslate2" | "llama.cpp"
    generation: GenerationSettings | None = None
    lineage: Lineage = field(default_factory=Lineage)
    split: Split | None = None
    extra: dict = field(default_factory=dict)         # stage-specific facts (files, lora, verification, ...)
    config_file: dict | None = None                   # --config=FILE: its path and sha256
    inputs: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    git_commit: str | None = None
    created: str = field(default_factory=_now)
    schema_version: int = SCHEMA_VERSION

    # -- what later stages inherit -------------------------------------------------------------
    def carried(self) -> dict:
        """The model facts a derived folder (merged, cleaned, exported) carries over unchanged."""
        return {"family": self.family, "instruction": self.instruction, "prompt_style": self.prompt_style,
                "seq2seq_prefix": self.seq2seq_prefix, "max_input_length": self.max_input_length,
                "max_target_length": self.max_target_length, "load_in_4bit": self.load_in_4bit,
                "generation": self.generation, "split": self.split,
                "lineage": Lineage(**asdict(self.lineage))}

    def inheritable(self) -> dict[str, Any]:
        """Stage setting name -> the value this record holds for it (None when it holds none)."""
        generation = self.generation.as_dict() if self.generation else {}
        values = {name: generation.get(name.lower()) for name in GenerationSettings.names()}
        values.update(INSTRUCTION=self.instruction, MAX_INPUT_LENGTH=self.max_input_length,
                      MAX_TARGET_LENGTH=self.max_target_length, LOAD_IN_4BIT=self.load_in_4bit)
        if self.split is not None:
            values.update(NORMALIZE=self.split.normalize, SEED=self.split.seed,
                          VAL_FRACTION=self.split.val_fraction, TEST_FRACTION=self.split.test_fraction)
        return values

    def inherit_into(self, cfg: dict, names: Iterable[str]) -> list[str]:
        """Fill each of `names` still None in `cfg` from this record; returns what was filled.
        DECODING and NUM_BEAMS are one choice: what the stage set of them decides what it
        inherits (contract/decoding.py `coupled_skips`)."""
        values = self.inheritable()
        skip = coupled_skips(cfg)
        filled = []
        for name in names:
            if name not in skip and cfg.get(name) is None and values.get(name) is not None:
                cfg[name] = values[name]
                filled.append(name)
        return filled

    # -- (de)serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {"stage": self.stage, "schema_version": self.schema_version, "created": self.created}
        data.update({k: getattr(self, k) for k in _FLAT})
        data["generation"] = self.generation.as_dict() if self.generation else None
        data["lineage"] = {k: v for k, v in asdict(self.lineage).items() if v is not None}
        data["split"] = asdict(self.split) if self.split else None
        data.update(config=self.config, config_file=self.config_file, inputs=self.inputs, versions=self.versions,
                    git_commit=self.git_commit)
        clash = set(self.extra) & _KNOWN
        if clash:
            raise ValueError(f"extra keys {sorted(clash)} would shadow record fields")
        data.update(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        data = dict(data)
        if "schema_version" not in data:
            data = _upgrade_first_wave(data)
        lineage = Lineage(**{f.name: data.get("lineage", {}).get(f.name) for f in fields(Lineage)})
        split_data = data.get("split")
        split = Split(**{f.name: split_data[f.name] for f in fields(Split) if f.name in split_data}) \
            if isinstance(split_data, dict) else None
        generation = GenerationSettings.from_record(data["generation"]) if data.get("generation") else None
        extra = {k: v for k, v in data.items() if k not in _KNOWN}
        return cls(stage=data.get("stage") or "unknown", config=data.get("config") or {},
                   **{k: data.get(k) for k in _FLAT}, generation=generation, lineage=lineage, split=split,
                   extra=extra, config_file=data.get("config_file"), inputs=data.get("inputs") or {},
                   versions=data.get("versions") or {}, git_commit=data.get("git_commit"),
                   created=data.get("created") or "", schema_version=int(data.get("schema_version") or 1))


def _upgrade_first_wave(data: dict) -> dict:
    """Map a first-wave run_config.json (flat keys, no schema_version) onto the current fields."""
    lineage = {"base_model": data.pop("base_model", None), "merged_from": data.pop("merged_from", None),
               "cleaned_from": data.pop("cleaned_from", None), "adapter_sha256": data.pop("adapter_sha256", None),
               "exported_from": data.pop("exported_from", None)}
    if data.get("stage") == "train_bart_lora":
        lineage["adapter"] = data.get("config", {}).get("OUTPUT_DIR")
    elif lineage["merged_from"]:
        lineage["adapter"] = lineage["merged_from"]
    if data.get("import"):
        lineage["imported_from"] = (data.get("import") or {}).get("source")
    data["lineage"] = lineage
    dataset = data.pop("dataset", None)
    if isinstance(dataset, dict):
        config = data.get("config") or {}
        data["split"] = {"source": dataset.get("source"), "hub_config": dataset.get("hub_config"),
                         "columns": dataset.get("columns") or {}, "normalize": bool(dataset.get("normalize")),
                         "seed": dataset.get("seed"), "val_fraction": dataset.get("val_fraction"),
                         "test_fraction": dataset.get("test_fraction"),
                         "made_from_single_file": dataset.get("splits_made_from_single_file"),
                         "train_samples": config.get("TRAIN_SAMPLES"), "val_samples": config.get("VAL_SAMPLES"),
                         "train_rows": dataset.get("train_rows"), "validation_rows": dataset.get("validation_rows"),
                         "dropped_empty_rows": dataset.get("dropped_empty_rows") or {}}
    if data.get("backend") == "ctranslate2" or data.get("stage") == "export_gguf" and "quantization" in data:
        data["backend"] = data.get("backend") or "ctranslate2"
    data["schema_version"] = 1
    return data


# ----------------------------------------------------------------------------- files

def read_record(folder: str | Path, name: str | None = None) -> RunRecord | None:
    """The record in `folder` (or `folder/<name>`), None when there is none; a clear error when it
    is unreadable."""
    path = Path(resolve(folder)) / (name or RECORD_FILE)
    if not path.is_file():
        return None
    record = RunRecord.from_dict(read_json_object(path, "restore it or re-run the stage that wrote it"))
    for name in ("base_model", "adapter", "merged_from", "cleaned_from", "exported_from", "imported_from"):
        setattr(record.lineage, name, from_code_folder(getattr(record.lineage, name)))
    if record.split is not None:
        record.split.source = from_code_folder(record.split.source)
    return record


def write_record(out_dir: str | Path, record: RunRecord, cfg: dict | None = None, inputs: Iterable = (),
                 name: str | None = None) -> Path:
    """Fill the provenance (settings, --config file, inputs, versions, commit) and write atomically."""
    if cfg is not None:
        record.config = dict(cfg)
        record.config_file = (getattr(cfg, "meta", None) or {}).get("config_file")
    record.inputs = describe_inputs(inputs)
    record.versions = library_versions()
    record.git_commit = git_commit()
    record.created = _now()
    path = Path(out_dir) / (name or RECORD_FILE)
    atomic_write_json(path, record.to_dict())
    return path

