"""Optional Weights & Biases tracking that never blocks and never asks for a login.

Online only when WANDB_API_KEY is set (and WANDB_MODE is not offline/disabled); offline when
WANDB_MODE=offline; off when WANDB_MODE=disabled, when wandb is not installed, or when `wandb.init`
fails for any reason (the run goes on without tracking and says so).
"""
from __future__ import annotations

import os


def wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("disabled", "offline", "online"):
        return "offline" if mode == "online" and not os.environ.get("WANDB_API_KEY") else mode
    return "online" if os.environ.get("WANDB_API_KEY") else "disabled"


def start_run(stage: str, config: dict, out_dir, name: str | None = None):
    """A wandb run, or None when tracking is off or unavailable."""
    mode = wandb_mode()
    if mode == "disabled":
        return None
    try:
        import wandb
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "finetuneflow"), job_type=stage,
                          name=name, config=dict(config), dir=str(out_dir), mode=mode, reinit="finish_previous")
    except Exception as exc:  # tracking must never stop a run
        print(f"W&B tracking off: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
        return None


def log(run, values: dict, step: int | None = None) -> None:
    if run is not None:
        run.log(values, step=step)


def finish(run) -> None:
    if run is not None:
        run.finish()
