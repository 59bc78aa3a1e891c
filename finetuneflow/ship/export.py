"""The export skeleton both formats share: validate -> settings -> convert -> verify -> report.

An `Exporter` (ship/gguf_export.py for llama.cpp/Ollama, ship/ct2_export.py for CTranslate2)
supplies the format's steps; `run_export` runs them in one order for both:

1. validate: the source is a full-precision Hugging Face model folder (ship/source.py) the format
   can take, NAME is a file name (never a path), and every output passes contract/safety.py
   before anything slow runs;
2. settings: instruction, input limit and decoding settings, from the stage's settings else the
   model's run record (`resolve_settings`);
3. convert into a temporary file or folder beside the output;
4. verify the converted copy against the Hugging Face model (ship/parity.py) - a failed or
   impossible verification writes nothing (`--VERIFY=False` exports unverified, and says so);
5. report: export_report.json and the run record (lineage exported_from), then the copy is moved
   into place.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from finetuneflow.contract.architectures import max_positions
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.paths import is_hub_id, resolve
from finetuneflow.contract.record import RunRecord, portable
from finetuneflow.contract.settings import FromConfig
from finetuneflow.ship.source import ModelFolder, inspect_model_folder

STAGE = "export_gguf"
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ExportSettings(FromConfig):
    model: str
    format: str = "gguf"
    outtype: str = "q8_0"
    quantization: str = "int8"
    name: str | None = None
    output_dir: str | None = None
    overwrite: bool = False
    pre_tokenizer: str | None = None
    verify: bool = True
    probe_dataset: str = "data/samples/dialogues.jsonl"
    probe_split: str = "test"
    n_probes: int = 4
    seed: int = 42
    instruction: str | None = None
    max_input_length: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 4


@dataclass
class Resolved:
    """What the export is verified with and carries forward."""
    instruction: str
    max_input_length: int
    generation: dict = field(default_factory=dict)   # decoding overrides (GenerationSettings fields)

    @property
    def max_new_tokens(self) -> int:
        return int(self.generation.get("max_new_tokens") or 128)

    def as_dict(self) -> dict:
        return {"instruction": self.instruction, "max_input_length": self.max_input_length,
                "generation": self.generation}


class Exporter:
    """One export format's steps (see the module docstring)."""
    format = "?"
    backend = "?"

    def kind(self, settings: ExportSettings) -> str:
        """The output type the thresholds are keyed by (outtype or quantization)."""
        raise NotImplementedError

    def validate(self, source: ModelFolder, settings: ExportSettings) -> None:
        """Refuse what this format cannot take (before anything is written)."""

    def targets(self, source: ModelFolder, settings: ExportSettings, name: str) -> dict[str, Path]:
        """Every output path, checked with contract/safety.py; "main" is the file or folder converted."""
        raise NotImplementedError

    @contextmanager
    def staged(self, targets: dict[str, Path]) -> Iterator[Path]:
        """A temporary file or folder that replaces targets["main"] when the block succeeds."""
        raise NotImplementedError
        yield

    def convert(self, source: ModelFolder, settings: ExportSettings, staged: Path, log) -> dict:
        raise NotImplementedError

    def verify(self, source: ModelFolder, settings: ExportSettings, resolved: Resolved, staged: Path,
               probes: list[dict], log) -> dict:
        """{"passed": bool | None, "checks": {...}, ...}; passed None: nothing could run the export."""
        raise NotImplementedError

    def publish(self, source: ModelFolder, settings: ExportSettings, resolved: Resolved, targets: dict[str, Path],
                staged: Path, report: dict, provenance: dict | None) -> dict[str, str]:
        """Write the report, the record and the extra files; returns {kind: path}."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- validate, settings

def _download(name: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:   # offline, gated, missing: all end the same way for the user
        raise UserError(f"MODEL={name!r} is not a local folder and could not be fetched from the Hub "
                        f"({type(exc).__name__}: {first_line(exc)}); pass a merged model folder") from None


def inspect_source(model: str) -> ModelFolder:
    """The model folder to export (a Hub id is downloaded), or one line naming the stage to run first."""
    path = resolve(model)
    downloaded = _download(model) if not path.exists() and is_hub_id(model) and "/" in model else None
    return inspect_model_folder(model, produced_by="post_merge_cleanup.py", path=downloaded)


def output_name(settings: ExportSettings, source: ModelFolder) -> str:
    """NAME (a file name, never a path), else the model folder's name made file-safe."""
    if settings.name is not None:
        if not _FILE_NAME.fullmatch(settings.name) or ".." in settings.name:
            raise UserError(f"--NAME={settings.name!r} must be a file name (letters, digits, . _ -), not a path; "
                            f"choose the folder with --OUTPUT_DIR")
        return settings.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name).lstrip(".") or "model"


def resolve_settings(source: ModelFolder, settings: ExportSettings) -> Resolved:
    """Instruction, input limit and decoding settings: the stage's, else the model's run record."""
    from finetuneflow.model.prompts import DEFAULT_INSTRUCTION
    run = source.record
    limit = max_positions(source.config) or 1024
    generation = run.generation.overrides() if run.generation else {}
    if settings.max_new_tokens:
        generation["max_new_tokens"] = settings.max_new_tokens
    return Resolved(settings.instruction or run.instruction or DEFAULT_INSTRUCTION,
                    int(settings.max_input_length or run.max_input_length or min(limit, 1024)), generation)


def exported_record(source: ModelFolder, resolved: Resolved, backend: str, extra: dict) -> RunRecord:
    """The run record of an export: the source model's facts, the settings it was verified with."""
    carried = source.record.carried()
    carried.update(family=source.family, instruction=resolved.instruction, max_input_length=resolved.max_input_length,
                   generation=GenerationSettings.from_record(resolved.generation))
    record = RunRecord(STAGE, **carried, backend=backend, extra=extra)
    record.lineage.exported_from = portable(source.path)
    return record


# ----------------------------------------------------------------------------- the skeleton

def print_side_by_side(rows: list[dict], labels: tuple[str, str], log=print) -> None:
    for row in rows:
        log(f"  [{row['id']}] {'same' if row['identical'] else 'DIFFERENT'}")
        for label in labels:
            log(f"    {label + ':':<14}{row[label][:200]}")


def verification_failure(verification: dict, kind: str) -> str | None:
    """Why a verification does not let the export be written (None when it passed)."""
    if verification.get("passed") is None:
        return (f"nothing here could load the export to verify it ({verification.get('note', 'no runtime')}); "
                f"nothing was written. Pass --VERIFY=False to export it unverified")
    if not verification["passed"]:
        failed = [f"{name}: {'; '.join(check['failures'])}" for name, check in verification["checks"].items()
                  if check.get("passed") is False]
        return f"the export does not match the model within the {kind} thresholds ({' | '.join(failed)}); " \
               f"nothing was written"
    return None


def run_export(exporter: Exporter, source: ModelFolder, settings: ExportSettings, provenance: dict | None = None,
               log=print) -> dict:
    """validate -> settings -> convert -> verify -> report (see the module docstring)."""
    exporter.validate(source, settings)
    name, kind = output_name(settings, source), exporter.kind(settings)
    targets = exporter.targets(source, settings, name)
    from finetuneflow.ship.parity import load_probes   # torch and datasets: only once the checks have passed
    resolved = resolve_settings(source, settings)
    probes = load_probes(settings.probe_dataset, settings.n_probes, settings.probe_split, settings.seed)[0] \
        if settings.verify else []
    with exporter.staged(targets) as staged:
        log(f"converting {source.path} -> {targets['main']} ({exporter.format}, {kind})")
        conversion = exporter.convert(source, settings, staged, log)
        verification = exporter.verify(source, settings, resolved, staged, probes, log) if settings.verify \
            else {"passed": None, "skipped": "VERIFY=False: the export was not compared with the model"}
        if settings.verify and (failure := verification_failure(verification, kind)):
            raise UserError(failure)
        report = {"format": exporter.format, "model": portable(source.path), "family": source.family,
                  "model_type": source.model_type, "type": kind, "name": name, "conversion": conversion,
                  "settings": resolved.as_dict(), "verification": verification}
        report["files"] = exporter.publish(source, settings, resolved, targets, staged, report, provenance)
    log("wrote " + ", ".join(Path(f).name for f in report["files"].values())
        + ("" if settings.verify else " (UNVERIFIED: --VERIFY=False)"))
    return report


def export(settings: ExportSettings, provenance: dict | None = None, log=print) -> dict:
    """export_gguf.py: the format's exporter through the shared skeleton."""
    from finetuneflow.ship.ct2_export import CT2Exporter
    from finetuneflow.ship.gguf_export import GGUFExporter
    source = inspect_source(settings.model)
    exporter = GGUFExporter() if settings.format == "gguf" else CT2Exporter()
    return run_export(exporter, source, settings, provenance, log)
