"""The export skeleton both formats share: validate -> settings -> convert -> verify -> gate -> report.

An `Exporter` (ship/gguf_export.py for llama.cpp/Ollama, ship/ct2_export.py for CTranslate2)
supplies the format's steps; `run_export` runs them in one order for both, for every output type
of the run at once (GGUF: `--OUTTYPE=q8_0,q4_k_m`). ship/export.py picks the exporter; the
exporters import this module, never the driver:

1. validate: the source is a full-precision Hugging Face model folder (ship/source.py) the format
   can take, NAME is a file name (never a path), and every output of every type (and the deploy
   report) passes contract/safety.py before anything slow runs;
2. settings: instruction, input limit and decoding settings, from the stage's settings else the
   model's run record (`resolve_settings`); the deploy gate finds its rows (ship/deploy_gate.py);
3. convert every type into a temporary file or folder beside its output;
4. verify each converted copy against the Hugging Face model (ship/parity.py; GGUF: the prompt
   and token audit first, ship/gguf_audit.py) - a failed or impossible verification writes
   nothing (`--VERIFY=False` exports unverified, and says so);
5. gate: each copy summarizes the held-out rows the model was evaluated on and gets a verdict,
   ship or hold (`--GATE=off` skips it; a hold writes nothing only with `--REQUIRE_SHIP=True`);
6. report: export_report.json and the run record (lineage exported_from) of each type, the deploy
   report, then the copies are moved into place. Until then nothing is written: an error or an
   interruption at any step leaves the earlier outputs as they were.
"""
from __future__ import annotations

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from finetuneflow.contract.architectures import max_positions
from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError
from finetuneflow.contract.record import RunRecord, portable
from finetuneflow.model.family import CAUSAL_DEFAULTS
from finetuneflow.contract.settings import FromConfig
from finetuneflow.ship.source import ModelFolder

STAGE = "export_gguf"
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ExportSettings(FromConfig):
    model: str
    format: str = "gguf"
    outtype: tuple[str, ...] = ("q8_0",)      # GGUF types (a single string is one type)
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
    gate: str = "on"
    gate_samples: int | None = None
    gate_eval: str | None = None
    require_ship: bool = False
    ladder: tuple[str, ...] = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs", "q3_k_m")   # OUTTYPE=auto's rungs
    imatrix: str | None = None                 # None | auto | a file written by llama-imatrix
    imatrix_rows: int = 200
    server: str = "on"                         # llama-server parity in the gate
    server_port: int | None = None
    unsupported_margin: float = 5.0            # points (non-inferiority margins of the gate's verdict)
    runaway_margin: float = 3.0

    def __post_init__(self):
        object.__setattr__(self, "outtype", _type_names(self.outtype, "OUTTYPE"))
        object.__setattr__(self, "ladder", _type_names(self.ladder, "LADDER"))


def _type_names(value, setting: str) -> tuple[str, ...]:
    """A list of GGUF type names as typed (q8_0,Q4_K_M), lower case, each once, in order."""
    types = [value] if isinstance(value, str) else list(value or [])
    names = tuple(dict.fromkeys(str(t).strip().lower().replace("-", "_") for t in types if str(t).strip()))
    if not names:
        raise UserError(f"{setting} is empty; pick one or more of f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, iq4_xs, "
                        f"q3_k_m" + (", or auto" if setting == "OUTTYPE" else ""))
    return names


@dataclass
class Resolved:
    """What the export is verified with and carries forward."""
    instruction: str
    max_input_length: int
    generation: dict = field(default_factory=dict)   # decoding overrides (GenerationSettings fields)

    @property
    def max_new_tokens(self) -> int:
        """Exports are decoder-only (GGUF) or carry their own limit: the causal family's default when unset."""
        return int(self.generation.get("max_new_tokens") or CAUSAL_DEFAULTS["max_new_tokens"])

    def as_dict(self) -> dict:
        return {"instruction": self.instruction, "max_input_length": self.max_input_length,
                "generation": self.generation}


class Exporter:
    """One export format's steps (see the module docstring). Each output type of the run is a
    `kind`; `targets`, `verify` and `publish` work on one kind, `convert` on all of them."""
    format = "?"
    backend = "?"

    def kinds(self, settings: ExportSettings) -> list[str]:
        """The output types of this run (GGUF outtypes, or the CT2 quantization)."""
        raise NotImplementedError

    def validate(self, source: ModelFolder, settings: ExportSettings) -> None:
        """Refuse what this format cannot take (before anything is written)."""

    def targets(self, source: ModelFolder, settings: ExportSettings, name: str, kind: str) -> dict[str, Path]:
        """Every output path of one kind, checked with contract/safety.py; "main" is the file or folder converted."""
        raise NotImplementedError

    def report_paths(self, source: ModelFolder, settings: ExportSettings, name: str,
                     targets: dict[str, dict[str, Path]]) -> dict[str, Path]:
        """Where the deploy report goes ("json", "html"), checked like the other outputs."""
        raise NotImplementedError

    @contextmanager
    def staged(self, targets: dict[str, Path]) -> Iterator[Path]:
        """A temporary file or folder that replaces targets["main"] when the block succeeds."""
        raise NotImplementedError
        yield

    def convert(self, source: ModelFolder, settings: ExportSettings, staged: dict[str, Path], stack: ExitStack,
                log) -> dict[str, dict]:
        """Convert into every staged path ({kind: path}); `stack` holds temporary files until the end."""
        raise NotImplementedError

    def verify(self, source: ModelFolder, settings: ExportSettings, resolved: Resolved, kind: str, staged: Path,
               probes: list[dict], log) -> dict:
        """{"passed": bool | None, "checks": {...}, ...}; passed None: nothing could run the export."""
        raise NotImplementedError

    def artifact(self, source: ModelFolder, kind: str, targets: dict[str, Path], staged: Path):
        """The converted copy as the deploy gate runs it (ship/deploy_gate.py `Artifact`)."""
        raise NotImplementedError

    def publish(self, source: ModelFolder, settings: ExportSettings, resolved: Resolved, kind: str,
                targets: dict[str, Path], staged: Path, report: dict, provenance: dict | None) -> dict[str, str]:
        """Write the report, the record and the extra files of one kind; returns {what: path}."""
        raise NotImplementedError

    def deploy_paths(self, report_paths: dict[str, Path], staged: dict[str, Path]) -> dict[str, Path]:
        """Where the deploy report is written now (inside a staged folder, or the checked paths)."""
        return report_paths

    def audit(self, source: ModelFolder, settings: ExportSettings, resolved: Resolved, kind: str, staged: Path,
              log) -> dict | None:
        """The format's prompt and token audit alone (VERIFY=False with the gate on: it runs before any
        score); None when the format has none."""
        return None

    def forget_deploy_report(self, report_paths: dict[str, Path], kinds: list[str], log) -> None:
        """GATE=off: an earlier deploy report that judged a file this run replaces no longer holds."""

    def tolerant(self, settings: ExportSettings) -> bool:
        """Whether a type whose verification fails is reported (and not gated) instead of stopping the
        run (GGUF OUTTYPE=auto: a rung of the ladder)."""
        return False

    def gate_order(self, settings: ExportSettings, artifacts: list) -> tuple[list, bool]:
        """The artifacts in the order the gate runs them, and whether it stops at the first that ships."""
        return artifacts, False

    def published(self, settings: ExportSettings, deploy: dict | None, kinds: list[str], log=print) -> list[str]:
        """The kinds this run writes (all of them, unless the format chooses after the gate)."""
        return kinds

    def drop(self, staged: Path) -> None:
        """A staged output that is not published (its temporary copy is removed, nothing replaced)."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- validate, settings

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


def _verify_all(exporter: Exporter, source: ModelFolder, settings: ExportSettings, resolved: Resolved,
                staged: dict[str, Path], probes: list[dict], log) -> dict[str, dict]:
    out = {}
    for kind, path in staged.items():
        if settings.verify:
            verification = exporter.verify(source, settings, resolved, kind, path, probes, log)
            if failure := verification_failure(verification, kind):
                if not exporter.tolerant(settings):
                    raise UserError(failure if len(staged) == 1 else f"{kind}: {failure}")
                verification["failure"] = failure.removesuffix("; nothing was written")
                log(f"{kind}: verification failed, so it is not gated: {verification['failure']}")
        else:
            verification = {"passed": None, "skipped": "VERIFY=False: the export was not compared with the model"}
            audit = exporter.audit(source, settings, resolved, kind, path, log) if settings.gate == "on" else None
            if audit is not None:
                verification["checks"] = {"audit": audit}
        out[kind] = verification
    return out


def _gate(exporter: Exporter, gate, source: ModelFolder, settings: ExportSettings, targets, staged,
          verifications: dict[str, dict]) -> dict | None:
    if gate is None:
        return None
    from finetuneflow.ship.deploy_gate import artifact_hashes
    artifacts = [exporter.artifact(source, kind, targets[kind], path) for kind, path in staged.items()]
    for artifact in artifacts:
        failure = verifications[artifact.label].get("failure")
        if failure and not artifact.skipped:
            artifact.skipped = f"its verification failed ({failure})"
    ordered, first_ship = exporter.gate_order(settings, artifacts)
    report = gate.run(ordered, first_ship)
    if settings.require_ship:
        gate.require_ship(report)
    artifact_hashes(report, artifacts)
    return report


def _write_deploy_report(exporter: Exporter, report: dict, audits: dict, paths: dict[str, Path],
                         staged: dict[str, Path]) -> dict[str, str]:
    from finetuneflow.contract.io import atomic_write_json, atomic_write_text
    from finetuneflow.ship.gate_report import deploy_html
    report["audit"] = audits
    where = exporter.deploy_paths(paths, staged)
    atomic_write_json(where["json"], report)
    atomic_write_text(where["html"], deploy_html(report))
    return {"deploy_report": str(paths["json"]), "deploy_html": str(paths["html"])}


def _audit_summaries(verifications: dict[str, dict]) -> dict[str, dict]:
    """Per kind, the prompt audit's verdict and its prompts side by side (for the deploy report)."""
    out = {}
    for kind, verification in verifications.items():
        audit = (verification.get("checks") or {}).get("audit") or {}
        if "passed" in audit:
            shown = audit["checks"].get("modelfile", {})
            params = shown.get("parameters", {})
            out[kind] = {"passed": audit["passed"], "side_by_side": shown.get("side_by_side"),
                         "summary": "identical prompt token ids in transformers, the GGUF's chat template and the "
                                    "Ollama Modelfile" if audit["passed"] else audit.get("failure"),
                         "modelfile": f"stop {shown.get('stop')}, "
                                      + ", ".join(f"{k} {v}" for k, v in params.items())}
    return out


def _missing_folders(paths: list[Path]) -> list[Path]:
    """The folders above `paths` that do not exist yet (the staging creates them), deepest first."""
    missing = set()
    for path in paths:
        parent = Path(path).parent
        while not parent.exists():
            missing.add(parent)
            parent = parent.parent
    return sorted(missing, key=lambda p: -len(p.parts))


def _remove_empty(folders: list[Path]) -> None:
    """A run that wrote nothing leaves no empty folders behind (a finished one fills them)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def _keep(exporter: Exporter, settings: ExportSettings, deploy: dict | None, kinds: list[str],
          staged: dict[str, Path], log) -> list[str]:
    """The kinds to publish; the staged copies of the others are dropped."""
    published = exporter.published(settings, deploy, kinds, log)
    for kind in kinds:
        if kind not in published:
            exporter.drop(staged[kind])
    return published


def run_export(exporter: Exporter, source: ModelFolder, settings: ExportSettings, provenance: dict | None = None,
               log=print) -> dict:
    """validate -> settings -> convert -> verify -> gate -> report (see the module docstring).
    Returns the first type's report, with every type's under "exports" and the gate's under "deploy"."""
    exporter.validate(source, settings)
    name, kinds = output_name(settings, source), exporter.kinds(settings)
    targets = {kind: exporter.targets(source, settings, name, kind) for kind in kinds}
    report_paths = exporter.report_paths(source, settings, name, targets)
    from finetuneflow.ship.parity import load_probes   # torch and datasets: only once the checks have passed
    resolved = resolve_settings(source, settings)
    gate = None
    if settings.gate == "on":
        from finetuneflow.ship.deploy_gate import DeployGate
        gate = DeployGate(source, settings, resolved, log)
    probes = load_probes(settings.probe_dataset, settings.n_probes, settings.probe_split, settings.seed)[0] \
        if settings.verify else []
    with ExitStack() as stack:
        stack.callback(_remove_empty, _missing_folders([t["main"] for t in targets.values()]))
        staged = {kind: stack.enter_context(exporter.staged(targets[kind])) for kind in kinds}
        for kind in kinds:
            log(f"converting {source.path} -> {targets[kind]['main']} ({exporter.format}, {kind})")
        conversions = exporter.convert(source, settings, staged, stack, log)
        verifications = _verify_all(exporter, source, settings, resolved, staged, probes, log)
        deploy = _gate(exporter, gate, source, settings, targets, staged, verifications)
        kinds = _keep(exporter, settings, deploy, kinds, staged, log)
        reports = {}
        for kind in kinds:
            report = {"format": exporter.format, "model": portable(source.path), "family": source.family,
                      "model_type": source.model_type, "type": kind, "name": name, "conversion": conversions[kind],
                      "settings": resolved.as_dict(), "verification": verifications[kind]}
            if deploy is not None:
                report["deploy"] = next(r["verdict"] for r in deploy["artifacts"] if r["label"] == kind)
            report["files"] = exporter.publish(source, settings, resolved, kind, targets[kind], staged[kind], report,
                                               provenance)
            reports[kind] = report
        if deploy is not None:
            deploy["files"] = _write_deploy_report(exporter, deploy, _audit_summaries(verifications), report_paths,
                                                   staged)
        else:
            exporter.forget_deploy_report(report_paths, kinds, log)
    files = [Path(f).name for r in reports.values() for f in r["files"].values()]
    if deploy is not None:
        files += [Path(f).name for f in deploy["files"].values()]
    log("wrote " + ", ".join(dict.fromkeys(files)) + ("" if settings.verify else " (UNVERIFIED: --VERIFY=False)"))
    return {**reports[kinds[0]], "exports": reports, "deploy": deploy}
