"""The configuration contract: every parsing rule, every error, help, run_config and inheritance."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from finetuneflow.contract.settings import configure, help_text, inherit, parse_value, read_run_config, write_run_config
from finetuneflow.contract.errors import UserError

SCRIPT = '''"""Demo stage.

Run as: python demo.py
"""
MODEL = "facebook/bart-large-cnn"   # Hub id or folder
STEPS = 10                          # optimizer steps
LR = 2e-4                           # learning rate
USE_FP16 = False                    # half precision on GPU
TARGETS = ["q_proj", "v_proj"]      # LoRA target modules
SIZES = [1, 2]                      # ints
PARENT = None                       # None: inherit from upstream
lowercase_is_not_a_setting = 3
'''


@pytest.fixture
def script_globals(tmp_path) -> dict:
    path = tmp_path / "demo.py"
    path.write_text(SCRIPT)
    namespace = {"__file__": str(path)}
    exec(compile(SCRIPT, str(path), "exec"), namespace)
    return namespace


def test_defaults_come_from_the_constants(script_globals):
    cfg = configure(script_globals, [])
    assert cfg == {"MODEL": "facebook/bart-large-cnn", "STEPS": 10, "LR": 2e-4, "USE_FP16": False,
                   "TARGETS": ["q_proj", "v_proj"], "SIZES": [1, 2], "PARENT": None}
    assert cfg.STEPS == 10


@pytest.mark.parametrize("argv", [["--steps=5"], ["--STEPS", "5"], ["--Steps=5"], ["--steps", "5"]])
def test_equals_and_space_forms_case_insensitive(script_globals, argv):
    assert configure(script_globals, argv).STEPS == 5


def test_dash_and_underscore_are_equivalent(script_globals):
    assert configure(script_globals, ["--use-fp16=true"]).USE_FP16 is True


@pytest.mark.parametrize("raw,expected", [("true", True), ("1", True), ("yes", True), ("False", False),
                                          ("0", False), ("no", False)])
def test_booleans(script_globals, raw, expected):
    assert configure(script_globals, [f"--use_fp16={raw}"]).USE_FP16 is expected


def test_int_is_accepted_for_float(script_globals):
    cfg = configure(script_globals, ["--lr=1"])
    assert cfg.LR == 1.0 and isinstance(cfg.LR, float)
    assert configure(script_globals, ["--lr=3e-5"]).LR == 3e-5


@pytest.mark.parametrize("raw", ['q_proj,k_proj', '["q_proj","k_proj"]', "q_proj, k_proj"])
def test_lists(script_globals, raw):
    assert configure(script_globals, [f"--targets={raw}"]).TARGETS == ["q_proj", "k_proj"]


def test_numeric_lists_keep_their_type(script_globals):
    assert configure(script_globals, ["--sizes=3,4"]).SIZES == [3, 4]


def test_none_default_accepts_any_literal_or_string(script_globals):
    assert configure(script_globals, ["--parent=3"]).PARENT == 3
    assert configure(script_globals, ["--parent=ft_outputs/x"]).PARENT == "ft_outputs/x"
    assert configure(script_globals, ["--parent=None"]).PARENT is None


def test_quoted_string_loses_its_quotes(script_globals):
    assert configure(script_globals, ["--model='t5-small'"]).MODEL == "t5-small"


@pytest.mark.parametrize("argv,message", [
    (["--steps=ten"], "--STEPS='ten' is not a valid int"),
    (["--steps=1.5"], "is not a valid int"),
    (["--use_fp16=maybe"], "is not a valid bool"),
    (["--lr=fast"], "is not a valid float"),
    (["--stesp=3"], "unknown setting --stesp; did you mean --STEPS?"),
    (["--zzzzzz=3"], "unknown setting --zzzzzz; see --help"),
    (["positional"], "unexpected argument 'positional'"),
    (["--steps"], "--steps needs a value"),
])
def test_errors(script_globals, argv, message):
    with pytest.raises(UserError, match=None) as info:
        configure(script_globals, argv)
    assert message in str(info.value)


def test_help_lists_docstring_constants_defaults_and_comments(script_globals, capsys):
    with pytest.raises(SystemExit) as info:
        configure(script_globals, ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Demo stage.")
    assert "--STEPS=10    # optimizer steps" in out
    assert "--TARGETS=['q_proj', 'v_proj']    # LoRA target modules" in out
    assert "lowercase_is_not_a_setting" not in out
    assert help_text(script_globals) in out


def test_parse_value_direct():
    assert parse_value("X", "[1, 2]", None) == [1, 2]
    assert parse_value("X", "0.5", 1.0) == 0.5


def test_run_config_records_config_versions_inputs_and_hashes(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n')
    path = write_run_config(tmp_path / "out", "demo", {"STEPS": 3}, [data, "some/hub-id"], {"family": "causal"})
    record = json.loads(path.read_text())
    assert record["stage"] == "demo" and record["config"] == {"STEPS": 3} and record["family"] == "causal"
    assert record["inputs"][str(data)] == hashlib.sha256(b'{"a": 1}\n').hexdigest()
    assert record["inputs"]["some/hub-id"] == "hub-or-remote"
    assert record["versions"]["transformers"] and record["versions"]["python"]
    assert not list((tmp_path / "out").glob("*.tmp")), "no temp files left behind"


def test_inherit_fills_only_none(tmp_path):
    write_run_config(tmp_path, "train", {"MAX_INPUT_LENGTH": 512, "NUM_BEAMS": 4}, extra={"family": "causal"})
    upstream = read_run_config(tmp_path)
    cfg = {"MAX_INPUT_LENGTH": None, "NUM_BEAMS": 2, "family": None, "MISSING": None}
    filled = inherit(cfg, upstream, ["MAX_INPUT_LENGTH", "NUM_BEAMS", "family", "MISSING"])
    assert filled == ["MAX_INPUT_LENGTH", "family"]
    assert cfg == {"MAX_INPUT_LENGTH": 512, "NUM_BEAMS": 2, "family": "causal", "MISSING": None}
    assert read_run_config(Path(tmp_path) / "nowhere") is None


def test_constants_after_the_imports_are_internal_not_settings(tmp_path):
    source = 'STEPS = 1  # steps\nimport os\nINTERNAL = os.sep\n'
    path = tmp_path / "stage.py"
    path.write_text(source)
    namespace = {"__file__": str(path)}
    exec(compile(source, str(path), "exec"), namespace)
    assert configure(namespace, []) == {"STEPS": 1}
    with pytest.raises(UserError, match="unknown setting --internal"):
        configure(namespace, ["--internal=x"])
