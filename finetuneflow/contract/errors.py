"""One kind of error for bad input, and the wrapper that turns it into one clear line."""
from __future__ import annotations

import os
import sys
from typing import Callable


class UserError(Exception):
    """Bad input or a missing prerequisite: the message names the problem and the fix."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def run_cli(main: Callable[..., dict]) -> None:
    """Run a stage's `main()`; a UserError prints one `error:` line to stderr and exits with code 2.
    A failed read or write (permissions, a full disk, a folder where a file was expected) is the
    user's environment, not a bug, so it gets the same one line naming the path."""
    _quiet_library_progress_bars()
    from finetuneflow.contract import environment
    if environment.problem:   # the .env file could not be applied: stop before the stage does anything
        print(f"error: {environment.problem}", file=sys.stderr)
        raise SystemExit(2)
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
        print(f"error: cannot use {exc.filename or 'a path'}: {exc.strerror or first_line(exc)}; check the path "
              f"and its permissions", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        if exc.errno is None or exc.filename is None:
            raise
        print(f"error: {exc.filename}: {exc.strerror}; check the path, free space and permissions", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def _quiet_library_progress_bars() -> None:
    """Per-file bars ("Loading weights", "Map") drown the stage's own output in logs. Only the
    libraries a stage has already imported are touched (no import for a stage that needs none)."""
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
