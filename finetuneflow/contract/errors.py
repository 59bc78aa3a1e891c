"""One kind of error for bad input, and the wrapper that turns it into one clear line."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input or a missing prerequisite: the message names the problem and the fix."""


def run_cli(main: Callable[..., dict]) -> None:
    """Run a stage's `main()`; a UserError prints one line to stderr and exits with code 2."""
    _quiet_library_progress_bars()
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _quiet_library_progress_bars() -> None:
    """Per-file bars ("Loading weights", "Map") drown the stage's own output in logs."""
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
