"""Data loading: every file type, column detection, splits, subsets, and every bad-input error."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import SAMPLES
from finetuneflow.contract.data import (get_split, load_dialogues, normalize_dialogue, split_deterministic, subset)
from finetuneflow.contract.errors import UserError

ROWS = [{"fname": f"r{i}", "dialog": f"A: hello {i}\nB: hi {i}", "highlights": f"They greet {i}."} for i in range(20)]


def write(tmp_path, name: str, rows=ROWS):
    path = tmp_path / name
    frame = pd.DataFrame(rows)
    if name.endswith(".jsonl"):
        frame.to_json(path, orient="records", lines=True)
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".csv"):
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet"])
def test_every_file_type_and_column_detection(tmp_path, name):
    data = load_dialogues(str(write(tmp_path, name)), val_fraction=0.1, test_fraction=0.1)
    assert data.columns == {"dialogue": "dialog", "summary": "highlights", "id": "fname"}
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 16, "validation": 2, "test": 2}
    assert data.made_splits
    train = data.splits["train"]
    assert train.column_names == ["id", "dialogue", "summary"]
    all_ids = sorted(i for ds in data.splits.values() for i in ds["id"])
    assert all_ids == sorted(r["fname"] for r in ROWS)


def test_folder_with_split_files_keeps_its_splits(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write(folder, "train.jsonl", ROWS[:12])
    write(folder, "validation.jsonl", ROWS[12:16])
    write(folder, "test.jsonl", ROWS[16:])
    data = load_dialogues(str(folder))
    assert {k: len(v) for k, v in data.splits.items()} == {"train": 12, "validation": 4, "test": 4}
    assert not data.made_splits


def test_split_is_deterministic_and_depends_on_seed(tmp_path):
    path = str(write(tmp_path, "d.jsonl"))
    a = load_dialogues(path, seed=1).splits["validation"]["id"]
    assert a == load_dialogues(path, seed=1).splits["validation"]["id"]
    assert a != load_dialogues(path, seed=2).splits["validation"]["id"]


def test_subset_is_reproducible(tmp_path):
    train = load_dialogues(str(write(tmp_path, "d.jsonl"))).splits["train"]
    assert subset(train, 5, 7)["id"] == subset(train, 5, 7)["id"]
    assert len(subset(train, 5, 7)) == 5
    assert len(subset(train, 0, 7)) == len(train) == len(subset(train, 999, 7))


def test_explicit_columns_and_missing_column_lists_columns(tmp_path):
    path = str(write(tmp_path, "d.jsonl"))
    data = load_dialogues(path, dialogue_column="dialog", summary_column="highlights", id_column="fname")
    assert data.columns["summary"] == "highlights"
    expected = r"column 'summary' \(summary\) not found; columns found: fname, dialog, highlights"
    with pytest.raises(UserError, match=expected):
        load_dialogues(path, summary_column="summary")


def test_no_summary_column_names_what_exists(tmp_path):
    rows = [{"dialogue": "A: hi", "abstract": "x"}]
    with pytest.raises(UserError, match="no summary column found .* columns found: dialogue, abstract"):
        load_dialogues(str(write(tmp_path, "d.jsonl", rows)))


def test_empty_rows_are_dropped_and_counted(tmp_path):
    rows = ROWS[:10] + [{"fname": "e1", "dialog": "   ", "highlights": "x"},
                        {"fname": "e2", "dialog": "A: hi", "highlights": ""}]
    data = load_dialogues(str(write(tmp_path, "d.jsonl", rows)), val_fraction=0, test_fraction=0)
    assert data.dropped == {"train": 2} and len(data.splits["train"]) == 10


def test_only_empty_rows_is_an_error(tmp_path):
    rows = [{"dialogue": " ", "summary": "x"}, {"dialogue": "A: hi", "summary": "\n"}]
    with pytest.raises(UserError, match="no usable rows"):
        load_dialogues(str(write(tmp_path, "d.jsonl", rows)))


def test_non_text_value_names_the_row(tmp_path):
    rows = [{"id": "a", "dialogue": "A: hi", "summary": "ok"}, {"id": "b", "dialogue": 42, "summary": "ok"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(UserError, match=r"row 1 \(id 'b'\): dialogue is int, not text"):
        load_dialogues(str(tmp_path / "d.jsonl"))


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(UserError, match="neither a local file/folder"):
        load_dialogues(str(tmp_path / "nope.jsonl"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="no readable data file"):
        load_dialogues(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="cannot be read as json"):
        load_dialogues(str(tmp_path / "broken.jsonl"))


def test_unknown_split_lists_splits(tmp_path):
    data = load_dialogues(str(write(tmp_path, "d.jsonl")), test_fraction=0)
    assert len(get_split(data, "val")) == 2
    with pytest.raises(UserError, match="split 'test' not in .* splits found: train, validation"):
        get_split(data, "test")


def test_bad_fractions():
    import datasets
    with pytest.raises(UserError, match="VAL_FRACTION and TEST_FRACTION"):
        split_deterministic(datasets.Dataset.from_dict({"x": [1]}), 0, 0.6, 0.5)


def test_normalization_is_optional_and_documented():
    raw = "#Person1#: Hi  \r\n\r\n#Person2#: Hello\r\n"
    assert normalize_dialogue(raw) == "#Person1#: Hi\n#Person2#: Hello"
    assert normalize_dialogue(raw, speaker_tags=True) == "Person1: Hi\nPerson2: Hello"
    data = load_dialogues(str(SAMPLES), normalize=True)
    assert not any("#Person" in d for ds in data.splits.values() for d in ds["dialogue"])


def test_bundled_samples_shape():
    rows = [json.loads(line) for line in SAMPLES.read_text().splitlines()]
    assert len(rows) >= 30
    styles = {"#Person1#:": 0, "Speaker A:": 0, "other": 0}
    for row in rows:
        key = next((k for k in styles if row["dialogue"].startswith(k)), "other")
        styles[key] += 1
    assert min(styles.values()) >= 10
    assert max(len(r["dialogue"].split()) for r in rows) > 1000


def test_an_unreachable_hub_dataset_is_one_line_naming_it_and_the_fix(tmp_path):
    """Offline here (conftest sets HF_HUB_OFFLINE): a Hub id with no cached copy is a UserError, not
    datasets' ConnectionError; the other causes (a typo'd or private id, no network) get their own fix."""
    from datasets.exceptions import DatasetNotFoundError
    from finetuneflow.contract.data import hub_problem
    with pytest.raises(UserError, match="'nobody/no-such-dialogues' is not a local file or folder .*HF_HUB_OFFLINE"):
        load_dialogues("nobody/no-such-dialogues")
    where = tmp_path / "nobody" / "typo"
    typo = hub_problem("nobody/typo", where, DatasetNotFoundError("Dataset 'nobody/typo' doesn't exist"), offline=False)
    assert "has no such dataset, or it is private or gated" in typo and "huggingface.co/datasets/nobody/typo" in typo
    down = hub_problem("nobody/typo", where, ConnectionError("Couldn't reach 'nobody/typo' on the Hub"), offline=False)
    assert "cannot be reached (Couldn't reach" in down and "HF_HUB_OFFLINE=1" in down
    for line in (typo, down):
        assert str(where) in line and "use a local file instead" in line and "\n" not in line
