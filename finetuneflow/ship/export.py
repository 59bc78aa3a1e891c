"""export_gguf.py's driver: find the model to export (a local folder, or a Hub id downloaded),
pick the format's exporter (ship/gguf_export.py for llama.cpp/Ollama, ship/ct2_export.py for
CTranslate2) and run it through the skeleton both share (ship/exporter.py: settings, the
`Exporter` steps and `run_export`).
"""
from __future__ import annotations

from pathlib import Path

from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.paths import is_hub_id, resolve
from finetuneflow.ship.exporter import ExportSettings, run_export
from finetuneflow.ship.source import ModelFolder, inspect_model_folder


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


def export(settings: ExportSettings, provenance: dict | None = None, log=print) -> dict:
    """export_gguf.py: the format's exporter through the shared skeleton."""
    from finetuneflow.ship.ct2_export import CT2Exporter
    from finetuneflow.ship.gguf_export import GGUFExporter
    source = inspect_source(settings.model)
    exporter = GGUFExporter() if settings.format == "gguf" else CT2Exporter()
    return run_export(exporter, source, settings, provenance, log)
