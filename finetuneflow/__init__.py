"""FineTuneFlow: the library shared by the stage scripts at the repository root."""
import logging

# bitsandbytes warns at import on every CPU machine that lacks the optional `kernels` package
# (it then uses its own CPU path); that line would otherwise open every stage's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# The project's .env, before any module reads the environment (FTF_ROOT decides the project root).
from finetuneflow.contract.environment import load_dotenv_files  # noqa: E402

load_dotenv_files()

__version__ = "0.1.0"
