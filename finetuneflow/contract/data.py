"""Dialogue data: Hub ids or local files, column mapping, splits, subsets and validation.

Every split comes back as a `datasets.Dataset` with exactly three columns, `id`, `dialogue`
and `summary` (strings), whatever the source called them; with `reference_columns` (several
references per row, e.g. DialogSum test's summary1..3) a fourth, `references` (every reference,
the first is `summary`), and a row needs all of them. Rows with an empty or
whitespace-only dialogue or summary are dropped and counted in `LoadedData.dropped`; a
non-text value is an error that names the row.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from finetuneflow.contract.errors import UserError, first_line
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import Split, fingerprint
from finetuneflow.contract.settings import FromConfig

DIALOGUE_CANDIDATES = ("dialogue", "dialog", "conversation", "text", "source", "document", "input")
SUMMARY_CANDIDATES = ("summary", "highlights", "target", "human_summary", "reference", "output")
ID_CANDIDATES = ("id", "sample_id", "fname", "idx", "guid")
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation",
                 "valid": "validation", "val": "validation", "dev": "validation", "test": "test"}
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class DataSpec(FromConfig):
    """Where the dialogues come from and how a single file is split (the stage settings of the
    same names)."""
    dataset: str
    hub_config: str | None = None
    dialogue_column: str | None = None
    summary_column: str | None = None
    id_column: str | None = None
    seed: int = 42
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    normalize: bool = False
    reference_columns: tuple = ()      # several references per row (the first is the summary)


@dataclass
class LoadedData:
    splits: dict[str, datasets.Dataset]
    source: str                                     # what was loaded (path or Hub id)
    columns: dict[str, str | None]                  # role -> source column name
    made_splits: bool                               # True when we split a single file ourselves
    dropped: dict[str, int] = field(default_factory=dict)   # split -> empty rows dropped
    local_files: list[Path] = field(default_factory=list)


def normalize_dialogue(text: str, speaker_tags: bool = False) -> str:
    """`\\r\\n` -> `\\n`, strip trailing spaces and blank lines; with `speaker_tags`, rewrite
    DialogSum's `#Person1#:` as `Person1:` (use the same setting for training and inference)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(line for line in lines if line.strip())
    if speaker_tags:
        text = re.sub(r"#(Person\d+)#", r"\1", text)
    return text.strip()


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in LOCAL_FORMATS)
    if not files or any(p.suffix.lower() not in LOCAL_FORMATS for p in files):
        raise UserError(f"{path}: no readable data file (.jsonl, .json, .csv or .parquet)")
    if len({LOCAL_FORMATS[p.suffix.lower()] for p in files}) > 1:
        raise UserError(f"{path}: mixes file formats; keep one format per folder")
    return files


def check_text_file(path: Path) -> None:
    """A local text data file must be non-empty UTF-8 (datasets would fail later, mid-iteration),
    a CSV must parse strictly (`read_csv_text`) and JSON text must hold no lone surrogate
    (`check_unicode`): each is one error naming the line, never a silent merge or a traceback."""
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{path} is empty: no dialogues to read; check the file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); re-save it "
                        f"as UTF-8") from None
    if path.suffix.lower() == ".csv":
        read_csv_text(text, str(path))
    elif _SURROGATE_ESCAPE.search(text):
        _check_json_unicode(text, path)


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def check_unicode(text: str, where: str) -> str:
    """`text` unchanged, or one error naming `where` when it holds a lone UTF-16 surrogate (a JSON
    "\\ud800" escape without its pair, or undecodable command-line bytes): no tokenizer or file
    takes it, and a guessed replacement would change the user's text silently."""
    found = _SURROGATE.search(text)
    if found:
        raise UserError(f"{where}: holds a lone UTF-16 surrogate (U+{ord(found.group()):04X}) at character "
                        f"{found.start()}, which is not text; fix that escape (\\ud800-\\udbff must be followed by "
                        f"\\udc00-\\udfff) or remove it")
    return text


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _check_json_unicode(text: str, path: Path) -> None:
    """Only lines that hold a surrogate escape are parsed (a valid pair is an emoji, not an error)."""
    pieces = [(number, line) for number, line in enumerate(text.splitlines(), 1) if _SURROGATE_ESCAPE.search(line)]
    if path.suffix.lower() == ".json":
        pieces = [(None, text)]
    for number, piece in pieces:
        try:
            value = json.loads(piece)
        except (json.JSONDecodeError, RecursionError):
            continue   # not this check's business: the JSON reader names the bad line
        for item in _strings(value):
            check_unicode(item, f"{path} line {number}" if number else str(path))


def read_csv_text(text: str, where: str) -> list[dict]:
    """The rows of CSV text as {header: value} (a short row's missing fields are None), read
    strictly: a quote that is never closed or not doubled inside a quoted field, or a row with
    more fields than the header, is one error naming the line where that row starts (a lenient
    reader merges rows or cuts a dialogue at a comma, silently). Every CSV reader goes through here."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, start, header = [], 1, None
    try:
        header = next(reader, None) or []
        start = reader.line_num + 1
        for fields in reader:
            if len(fields) > len(header):
                raise UserError(f"{where}: the row at line {start} has {len(fields)} fields but the header has "
                                f"{len(header)}; quote a field that holds a comma (\"...\")")
            if fields:
                rows.append(dict(zip(header, fields + [None] * (len(header) - len(fields)))))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise UserError(f"{where}: the row starting at line {start} is not valid CSV ({exc}, line {reader.line_num}): "
                        f"a quote is not closed, or a quote inside a quoted field is not doubled (\"\"); fix that "
                        f"row") from None
    return rows


def _split_of(file: Path) -> str | None:
    stem = file.stem.lower()
    for alias, split in SPLIT_ALIASES.items():
        if re.search(rf"(^|[^a-z]){alias}([^a-z]|$)", stem):
            return split
    return None


def _load_raw(dataset: str, hub_config: str | None) -> tuple[datasets.DatasetDict, bool, list[Path]]:
    path = resolve(dataset)
    if path.exists():
        files = _local_files(path)
        builder = LOCAL_FORMATS[files[0].suffix.lower()]
        if builder in ("json", "csv"):
            for file in files:
                check_text_file(file)
        by_split: dict[str, list[str]] = {}
        for file in files:
            by_split.setdefault(_split_of(file) or "train", []).append(str(file))
        if len(files) == 1 or set(by_split) == {"train"}:
            by_split = {"train": [str(f) for f in files]}
        try:
            raw = datasets.load_dataset(builder, data_files=by_split)
        except Exception as exc:  # datasets wraps parse errors in many types
            raise UserError(f"{path}: cannot be read as {builder} ({first_line(exc)}); check that it is UTF-8 "
                            f"{builder} with one record per row") from None
        return raw, len(by_split) == 1, files
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset) and not Path(dataset).suffix:
        return _load_hub(dataset, hub_config, path), False, []
    raise UserError(f"dataset not found: {dataset!r} is neither a local file/folder ({path}) nor a Hub id")


def _load_hub(dataset: str, hub_config: str | None, path: Path) -> datasets.DatasetDict:
    """A Hub dataset; one it cannot reach (offline, no network, a typo'd, private or gated id) is one
    error naming it and the fixes (`hub_problem`), never a traceback."""
    from datasets import config
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError
    try:
        return datasets.load_dataset(dataset, hub_config)
    except (ConnectionError, TimeoutError, DatasetNotFoundError, HfHubHTTPError) as exc:
        raise UserError(hub_problem(dataset, path, exc, offline=config.HF_HUB_OFFLINE)) from None


def hub_problem(dataset: str, path: Path, exc: BaseException, offline: bool) -> str:
    """Why the Hub dataset `dataset` could not be loaded and what to do, in one line (`offline`:
    HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)."""
    from datasets.exceptions import DatasetNotFoundError
    local = ("use a local file instead (.jsonl, .json, .csv or .parquet, e.g. --DATASET=data/my_dialogues.csv; "
             "relative paths are taken from the project root)")
    start = f"dataset {dataset!r} is not a local file or folder ({path}), and "
    if offline:
        return (start + "the Hugging Face Hub is off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set) with no cached "
                f"copy of it; {local}, or unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE to download it")
    if isinstance(exc, DatasetNotFoundError):
        return (start + f"the Hugging Face Hub has no such dataset, or it is private or gated; check the id "
                f"(https://huggingface.co/datasets/{dataset}), set HF_TOKEN for a private or gated one, or {local}")
    return (start + f"the Hugging Face Hub cannot be reached ({first_line(exc, 160)}); check the network (or "
            f"HTTPS_PROXY) and the id, set HF_HUB_OFFLINE=1 to use a cached copy, or {local}")


def pick_column(columns: list[str], wanted: str | None, candidates: tuple, role: str, required: bool,
                where: str = "") -> str | None:
    """The column holding `role`: `wanted` when given (it must exist), else the first of
    `candidates` (any case); None when there is none and it is not `required`. `where` (a file)
    starts the error lines."""
    prefix = f"{where}: " if where else ""
    if wanted:
        if wanted not in columns:
            missing = f"no column {wanted!r} ({role})" if where else f"column {wanted!r} ({role}) not found"
            raise UserError(f"{prefix}{missing}; columns found: {', '.join(columns)}")
        return wanted
    lowered = {c.lower(): c for c in columns}
    found = next((lowered[c] for c in candidates if c in lowered), None)
    if found is None and required:
        raise UserError(f"{prefix}no {role} column found (tried {', '.join(candidates)}); columns found: "
                        f"{', '.join(columns)}; set --{role.upper()}_COLUMN=<name>")
    return found


def _standardize(ds: datasets.Dataset, split: str, cols: dict, normalize: bool) -> tuple[datasets.Dataset, int]:
    ids = ds[cols["id"]] if cols["id"] else [f"{split}-{i}" for i in range(len(ds))]
    several = cols.get("references") or []
    rows = {"id": [], "dialogue": [], "summary": [], **({"references": []} if several else {})}
    references = list(zip(*(ds[c] for c in several))) if several else [(s,) for s in ds[cols["summary"]]]
    dropped = 0
    for i, (row_id, dialogue, refs) in enumerate(zip(ids, ds[cols["dialogue"]], references)):
        for role, value in (("dialogue", dialogue), *(("summary", r) for r in refs)):
            if value is not None and not isinstance(value, str):
                raise UserError(f"{split} row {i} (id {row_id!r}): {role} is {type(value).__name__}, "
                                f"not text; fix that row or choose another --{role.upper()}_COLUMN")
        if not (dialogue or "").strip() or not all((r or "").strip() for r in refs):
            dropped += 1
            continue
        rows["id"].append(str(row_id))
        rows["dialogue"].append(normalize_dialogue(dialogue, normalize) if normalize else dialogue.strip())
        rows["summary"].append(refs[0].strip())
        if several:
            rows["references"].append([r.strip() for r in refs])
    return datasets.Dataset.from_dict(rows), dropped


def reference_columns_of(columns: list[str], wanted, summary_column: str | None) -> list[str]:
    """REFERENCE_COLUMNS checked against the file's columns ([] for one reference)."""
    wanted = [c.strip() for c in (wanted or []) if c.strip()]
    if len(wanted) == 1:
        raise UserError(f"REFERENCE_COLUMNS={wanted[0]} names one column; use SUMMARY_COLUMN for one reference, or "
                        f"name every reference column (e.g. summary1,summary2,summary3)")
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise UserError(f"REFERENCE_COLUMNS: no column {missing[0]!r}; columns found: {', '.join(columns)}")
    if len(set(wanted)) != len(wanted):
        raise UserError(f"REFERENCE_COLUMNS names a column twice ({', '.join(wanted)})")
    if wanted and summary_column and summary_column != wanted[0]:
        raise UserError(f"SUMMARY_COLUMN={summary_column} and REFERENCE_COLUMNS={','.join(wanted)}: the first "
                        f"reference column is the summary; drop SUMMARY_COLUMN or put it first")
    return wanted


def load_dialogues(dataset: str, dialogue_column: str | None = None, summary_column: str | None = None,
                   id_column: str | None = None, seed: int = 42, val_fraction: float = 0.1,
                   test_fraction: float = 0.1, normalize: bool = False,
                   hub_config: str | None = None, reference_columns=()) -> LoadedData:
    """Load a dataset into standard train/validation/test splits (those that exist)."""
    raw, single, files = _load_raw(dataset, hub_config)
    renamed = {SPLIT_ALIASES.get(name.lower(), name): raw[name] for name in raw}
    first = next(iter(renamed.values()))
    columns = list(first.column_names)
    several = reference_columns_of(columns, reference_columns, summary_column)
    cols = {"dialogue": pick_column(columns, dialogue_column, DIALOGUE_CANDIDATES, "dialogue", True),
            "summary": several[0] if several else pick_column(columns, summary_column, SUMMARY_CANDIDATES,
                                                              "summary", True),
            "id": pick_column(columns, id_column, ID_CANDIDATES, "id", False)}
    if several:
        cols["references"] = several
    splits, dropped = {}, {}
    for name, ds in renamed.items():
        splits[name], dropped[name] = _standardize(ds, name, cols, normalize)
    made = False
    if single and set(splits) == {"train"} and (val_fraction or test_fraction):
        splits = split_deterministic(splits["train"], seed, val_fraction, test_fraction)
        made = True
    if sum(len(ds) for ds in splits.values()) == 0:
        raise UserError(f"{dataset}: no usable rows (all {sum(dropped.values())} rows have an empty "
                        f"dialogue or summary)")
    return LoadedData(splits, str(dataset), cols, made, dropped, files)


def load_data(spec: DataSpec) -> LoadedData:
    return load_dialogues(spec.dataset, spec.dialogue_column, spec.summary_column, spec.id_column, spec.seed,
                          spec.val_fraction, spec.test_fraction, bool(spec.normalize), spec.hub_config,
                          tuple(spec.reference_columns or ()))


def load_as_recorded(split: Split, dataset: str | None = None) -> LoadedData:
    """The data a run record's split names (or `dataset`, the same data found elsewhere), read with
    the settings it was trained with: its columns, seed, fractions, normalization and Hub config."""
    columns = split.columns or {}
    return load_dialogues(dataset or split.source, columns.get("dialogue"), columns.get("summary"), columns.get("id"),
                          42 if split.seed is None else split.seed,
                          0.0 if split.val_fraction is None else split.val_fraction,
                          0.0 if split.test_fraction is None else split.test_fraction, bool(split.normalize),
                          split.hub_config)


def split_deterministic(ds: datasets.Dataset, seed: int, val_fraction: float,
                        test_fraction: float) -> dict[str, datasets.Dataset]:
    """Shuffle once with `seed` and cut into train/validation/test by the given fractions."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise UserError("VAL_FRACTION and TEST_FRACTION must be in [0, 1) and sum to less than 1")
    shuffled = ds.shuffle(seed=seed)
    n = len(shuffled)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    n_train = n - n_val - n_test
    out = {"train": shuffled.select(range(n_train))}
    if n_val:
        out["validation"] = shuffled.select(range(n_train, n_train + n_val))
    if n_test:
        out["test"] = shuffled.select(range(n_train + n_val, n))
    return out


def get_split(data: LoadedData, split: str) -> datasets.Dataset:
    """One split by name (aliases such as dev/val work), or "all": every split, in order."""
    if split.lower() == "all":
        return datasets.concatenate_datasets(list(data.splits.values())) if len(data.splits) > 1 \
            else next(iter(data.splits.values()))
    name = SPLIT_ALIASES.get(split.lower(), split)
    if name not in data.splits:
        raise UserError(f"split {split!r} not in {data.source}; splits found: {', '.join(data.splits)} "
                        f"(or --split=all for every row)")
    return data.splits[name]


def training_splits(data: LoadedData, train_samples: int, val_samples: int, seed: int,
                    val_fraction: float) -> tuple[datasets.Dataset, datasets.Dataset, str | None]:
    """The seeded train and validation subsets; a validation split is carved from train when the
    data has none. Returns (train, validation, note about what was carved)."""
    if "train" not in data.splits:
        raise UserError(f"{data.source}: no train split (splits found: {', '.join(data.splits)})")
    train, note = data.splits["train"], None
    validation = data.splits.get("validation")
    if validation is None or len(validation) == 0:
        parts = split_deterministic(train, seed, val_fraction or 0.1, 0.0)
        train, validation = parts["train"], parts.get("validation")
        note = f"no validation split: kept {len(validation) if validation else 0} train rows for validation"
    dropped = sum(data.dropped.values())
    if len(train) == 0:
        raise UserError(f"{data.source}: no usable training rows ({dropped} rows with an empty dialogue or summary "
                        f"were dropped); check the file and the column settings")
    if validation is None or len(validation) == 0:
        raise UserError(f"{data.source}: no validation rows to evaluate on; add a validation split or raise "
                        f"VAL_FRACTION")
    return subset(train, train_samples, seed), subset(validation, val_samples, seed), note


def training_overlap(rows, split: Split | None) -> list[str] | None:
    """Ids of `rows` whose dialogue the model was trained on; None when the record cannot say."""
    if split is None:
        return None
    trained = set(split.train_fingerprints or legacy_train_fingerprints(split))
    if not trained:
        return None
    return [str(r["id"]) for r in rows if fingerprint(r["dialogue"]) in trained]


def subset(ds: datasets.Dataset, n: int | None, seed: int, shuffle: bool = True) -> datasets.Dataset:
    """The first `n` rows after a seeded shuffle (all rows when `n` is None, 0 or too large)."""
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if n and n < len(ds):
        ds = ds.select(range(n))
    return ds.flatten_indices() if shuffle or n else ds


def legacy_train_fingerprints(split: Split) -> list[str]:
    """A first-wave record names its training data but not its rows: rebuild them the way the
    trainer chose them (same file, seed, fractions and sample count), when the file is still there."""
    if not split.source or split.seed is None or not resolve(split.source).exists():
        return []
    data = load_as_recorded(split)
    train, _, _ = training_splits(data, split.train_samples or 0, split.val_samples or 0, split.seed,
                                  split.val_fraction or 0.0)
    return [fingerprint(d) for d in train["dialogue"]]
