"""FineTuneFlow: the library shared by the stage scripts at the repository root."""
import logging

# bitsandbytes warns at import on every CPU machine that lacks the optional `kernels` package
# (it then uses its own CPU path); that line would otherwise open every stage's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
