"""Experiment trackers for a training run: REPORT_TO = auto | none | wandb | tensorboard | mlflow
(or several, `tensorboard,mlflow`), through transformers' own Trainer integrations, so every tracker
receives the same logs: training loss, learning rate, gradient norm, peak memory, and per
evaluation the validation loss, ROUGE, unsupported-mention rate and what generating cost.

* auto (default): W&B when it would log (WANDB_API_KEY set, or WANDB_MODE=offline: the seed's
  default), else none. W&B never prompts for a login (quality/tracking.py).
* wandb asked for explicitly without a key and without WANDB_MODE: offline (files in ./wandb), said
  in one line; with WANDB_MODE=disabled: off, said in one line.
* tensorboard: event files in TRACKING_DIR/tensorboard/<OUTPUT_DIR name>-<time>/ (open with
  `tensorboard --logdir TRACKING_DIR/tensorboard`), or $TENSORBOARD_LOGGING_DIR when set.
* mlflow: a local file store in TRACKING_DIR/mlflow (`mlflow ui --backend-store-uri
  file:TRACKING_DIR/mlflow`; MLflow 3 needs MLFLOW_ALLOW_FILE_STORE=true for it, set here), or
  $MLFLOW_TRACKING_URI when set (a server); experiment $MLFLOW_EXPERIMENT_NAME or "finetuneflow".
A tracker that is not installed is an error before anything is loaded (with the pip command).
No module here imports torch.
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from finetuneflow.contract.errors import UserError

TRACKERS = ("wandb", "tensorboard", "mlflow")
PACKAGES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow-skinny"}
FILE_TRACKERS = ("tensorboard", "mlflow")     # the ones that write under TRACKING_DIR


def requested(report_to) -> list[str]:
    """REPORT_TO as a list of tracker names ("auto" -> W&B when it would log)."""
    from finetuneflow.quality.tracking import wandb_mode
    values = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [str(v).strip().lower() for v in values if str(v).strip()]
    if names in ([], ["none"]):
        return []
    if names == ["auto"]:
        return ["wandb"] if wandb_mode() != "disabled" else []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise UserError(f"REPORT_TO={','.join(names)}: {', '.join(unknown)} is not a tracker; use auto, none, or "
                        f"some of {', '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


def check_installed(trackers: list[str]) -> None:
    missing = [t for t in trackers if importlib.util.find_spec(t) is None]
    if missing:
        raise UserError(f"REPORT_TO={','.join(trackers)} but {', '.join(missing)} is not installed; run: pip install "
                        f"{' '.join(PACKAGES[t] for t in missing)} (or choose another --REPORT_TO)")


def prepare(trackers: list[str], tracking_dir: Path | None, run_name: str, say=print) -> list[str]:
    """Point the Trainer's integrations at TRACKING_DIR (environment variables they read; the
    user's own settings win) and settle W&B's mode. Returns the trackers that will log."""
    from finetuneflow.quality.tracking import wandb_mode
    active = list(trackers)
    if "wandb" in active and wandb_mode() == "disabled":
        if os.environ.get("WANDB_MODE", "").lower() == "disabled":
            say("REPORT_TO includes wandb but WANDB_MODE=disabled: W&B is off for this run")
            active.remove("wandb")
        else:
            os.environ["WANDB_MODE"] = "offline"
            say("REPORT_TO=wandb without WANDB_API_KEY: W&B logs offline into ./wandb (`wandb sync` uploads it)")
    if tracking_dir is not None and "tensorboard" in active and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(tracking_dir / "tensorboard" / f"{run_name}-{stamp}")
    if tracking_dir is not None and "mlflow" in active and not os.environ.get("MLFLOW_TRACKING_URI"):
        store = tracking_dir / "mlflow"
        store.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = store.resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if "mlflow" in active:
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "finetuneflow")
    return active


def where(active: list[str]) -> str:
    """Where each tracker logs, for the run's output."""
    places = {"wandb": f"W&B ({os.environ.get('WANDB_MODE') or 'online'})",
              "tensorboard": f"TensorBoard {os.environ.get('TENSORBOARD_LOGGING_DIR', 'runs/')}",
              "mlflow": f"MLflow {os.environ.get('MLFLOW_TRACKING_URI', '')} (experiment "
                        f"{os.environ.get('MLFLOW_EXPERIMENT_NAME', 'finetuneflow')})"}
    return "; ".join(places[t] for t in active) if active else "none"
