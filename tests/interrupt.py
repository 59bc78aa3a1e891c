"""A training run killed as a crash kills it: started as a user starts it, SIGKILLed once its first
checkpoint is complete (used by the resume tests of SFT and preference training)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import OFFLINE_ENV, REPO
from finetuneflow.train import run_dir


def kill_at_first_checkpoint(script: str, args: list[str], root: Path, checkpoints: Path, timeout: float = 300) -> None:
    """Run `script` with `args` under FTF_ROOT=root and SIGKILL it once a checkpoint below
    `checkpoints` carries the completion marker (it must still be running then)."""
    first = subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=REPO,
                             env={**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(root)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not list(checkpoints.glob("checkpoint-*/" + run_dir.COMPLETE_MARKER)):
        assert first.poll() is None and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
