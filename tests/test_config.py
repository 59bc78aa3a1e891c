"""The configuration contract: every parsing rule, every error, help, run_config and inheritance."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from finetuneflow.contract.errors import UserError
from finetuneflow.contract.record import RunRecord, read_record, write_record
from finetuneflow.contract.settings import SpecError, configure, help_text, parse_spec

SCRIPT = '''"""Demo stage.

Run as: python demo.py
"""
MODEL = "facebook/bart-large-cnn"   # Hub id or folder
STEPS = 10                          # optimizer steps
LR = 2e-4                           # learning rate
USE_FP16 = False                    # half precision on GPU
TARGETS = ["q_proj", "v_proj"]      # LoRA target modules
SIZES = [1, 2]                      # ints
PARENT = None                       # [str | None] None: inherit from upstream
BEAMS = None                        # [int >= 1 | None] beams
FOUR_BIT = None                     # [bool | None] None: inherit
MODE = "truncate"                   # [truncate | chunk | error] long inputs
DROPOUT = 0.05                      # [0 <= float < 1] dropout
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
                   "TARGETS": ["q_proj", "v_proj"], "SIZES": [1, 2], "PARENT": None, "BEAMS": None,
                   "FOUR_BIT": None, "MODE": "truncate", "DROPOUT": 0.05}
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


def test_a_none_default_keeps_its_declared_type(script_globals):
    assert configure(script_globals, ["--parent=ft_outputs/x"]).PARENT == "ft_outputs/x"
    assert configure(script_globals, ["--parent=None"]).PARENT is None
    assert configure(script_globals, ["--beams=3"]).BEAMS == 3
    # booleans parse as booleans even when the default is None ("false" is not a true string)
    assert configure(script_globals, ["--four_bit=false"]).FOUR_BIT is False
    assert configure(script_globals, ["--four-bit=YES"]).FOUR_BIT is True


def test_choices_are_matched_case_insensitively_and_stored_as_declared(script_globals):
    assert configure(script_globals, ["--mode=CHUNK"]).MODE == "chunk"


def test_quoted_string_loses_its_quotes(script_globals):
    assert configure(script_globals, ["--model='t5-small'"]).MODEL == "t5-small"


@pytest.mark.parametrize("argv,message", [
    (["--steps=ten"], "--STEPS=ten: is not a valid int"),
    (["--steps=1.5"], "is not a valid int"),
    (["--use_fp16=maybe"], "is not a valid bool"),
    (["--lr=fast"], "is not a valid float"),
    (["--stesp=3"], "unknown setting --stesp; did you mean --STEPS?"),
    (["--zzzzzz=3"], "unknown setting --zzzzzz; see --help"),
    (["positional"], "unexpected argument 'positional'"),
    (["--steps"], "--steps needs a value"),
    (["--beams=0"], "--BEAMS=0: out of range: must be int >= 1 | None"),
    (["--beams=2.5"], "is not a valid int >= 1 | None"),
    (["--four_bit=maybe"], "is not a valid bool | None"),
    (["--mode=chunky"], "--MODE=chunky: must be one of truncate, chunk, error"),
    (["--dropout=1"], "out of range: must be 0 <= float < 1"),
    (["--lr=1e999"], "--LR=1e999: is not a finite number"),
    (["--lr=nan"], "is not a finite number"),
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
    assert "--BEAMS=None  [int >= 1 | None]    # beams" in out and "[truncate | chunk | error]" in out
    assert "--TARGETS=['q_proj', 'v_proj']    # LoRA target modules" in out
    assert "lowercase_is_not_a_setting" not in out
    assert help_text(script_globals) in out


def test_specs_parse_and_describe():
    assert parse_spec("0 <= float < 1 | None").describe() == "0 <= float < 1 | None"
    assert parse_spec("list[f32 | q8_0]").describe() == "list[f32 | q8_0]"
    with pytest.raises(SpecError):
        parse_spec("int >= x")


def test_a_none_default_without_a_spec_is_a_developer_error(tmp_path):
    source = 'THING = None  # no spec\n'
    path = tmp_path / "stage.py"
    path.write_text(source)
    with pytest.raises(SpecError, match="THING = None needs a spec"):
        configure({"__file__": str(path), "THING": None}, [])


def test_an_edited_default_out_of_range_names_the_script_line(tmp_path):
    source = 'BEAMS = 0  # [int >= 1] beams\n'
    path = tmp_path / "stage.py"
    path.write_text(source)
    with pytest.raises(UserError, match="BEAMS = 0 at the top of stage.py: out of range"):
        configure({"__file__": str(path), "BEAMS": 0}, [])


def test_config_file_overrides_defaults_and_the_command_line_wins(script_globals, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps: 20\nlr: 5e-4\nmode: chunk\ntargets: [q_proj]\n")
    cfg = configure(script_globals, [f"--config={recipe}", "--steps=7"])
    assert (cfg.STEPS, cfg.LR, cfg.MODE, cfg.TARGETS) == (7, 5e-4, "chunk", ["q_proj"])
    assert cfg.meta["config_file"] == {"path": str(recipe), "sha256": hashlib.sha256(recipe.read_bytes()).hexdigest()}
    path = write_record(tmp_path / "out", RunRecord("demo"), cfg)
    assert json.loads(path.read_text())["config_file"]["path"] == str(recipe)


@pytest.mark.parametrize("text,message", [("stesp: 3\n", "unknown setting recipe.yaml: stesp; did you mean --STEPS?"),
                                          ("steps: ten\n", "--STEPS=ten: is not a valid int"),
                                          ("- a\n- b\n", "expected NAME: value lines"),
                                          ("steps: [1\n", "not valid YAML")])
def test_config_file_errors(script_globals, tmp_path, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(UserError) as info:
        configure(script_globals, [f"--config={recipe}"])
    assert message in str(info.value)


def test_old_names_still_work_with_a_note(script_globals, capsys):
    cfg = configure(script_globals, ["--model_name=t5-small"], renamed={"MODEL_NAME": "MODEL"})
    assert cfg.MODEL == "t5-small" and cfg.meta["renamed"] == ["MODEL_NAME"]
    assert "note: --MODEL_NAME is now --MODEL" in capsys.readouterr().err


def test_run_record_records_config_versions_inputs_and_hashes(tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n')
    path = write_record(tmp_path / "out", RunRecord("demo", family="causal", extra={"tag": "x"}), {"STEPS": 3},
                        [data, "some/hub-id"])
    record = json.loads(path.read_text())
    assert record["stage"] == "demo" and record["config"] == {"STEPS": 3} and record["family"] == "causal"
    assert record["schema_version"] == 2 and record["tag"] == "x"
    assert record["inputs"][str(data)] == hashlib.sha256(b'{"a": 1}\n').hexdigest()
    assert record["inputs"]["some/hub-id"] == "hub-or-remote"
    assert record["versions"]["transformers"] and record["versions"]["python"]
    assert not list((tmp_path / "out").glob("*.tmp")), "no temp files left behind"


def test_inherit_fills_only_none(tmp_path):
    from finetuneflow.contract.decoding import GenerationSettings
    write_record(tmp_path, RunRecord("train", family="causal", max_input_length=512,
                                     generation=GenerationSettings(num_beams=4)))
    upstream = read_record(tmp_path)
    cfg = {"MAX_INPUT_LENGTH": None, "NUM_BEAMS": 2, "MAX_NEW_TOKENS": None, "MISSING": None}
    filled = upstream.inherit_into(cfg, ["MAX_INPUT_LENGTH", "NUM_BEAMS", "MAX_NEW_TOKENS", "MISSING"])
    assert filled == ["MAX_INPUT_LENGTH"]
    assert cfg == {"MAX_INPUT_LENGTH": 512, "NUM_BEAMS": 2, "MAX_NEW_TOKENS": None, "MISSING": None}
    assert read_record(Path(tmp_path) / "nowhere") is None


def test_a_first_wave_record_loads_into_the_typed_record(tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({
        "stage": "merge_bart_lora", "config": {"ADAPTER": "a"}, "family": "causal", "instruction": "Sum.",
        "base_model": "/m/base", "merged_from": "/p/lora", "adapter_sha256": "ab", "max_input_length": 256,
        "generation": {"num_beams": 1, "max_new_tokens": 16, "min_new_tokens": None, "no_repeat_ngram_size": 3,
                       "length_penalty": 1.0},
        "dataset": {"source": "d.jsonl", "seed": 7, "val_fraction": 0.2, "test_fraction": 0.1, "normalize": True},
        "lora": {"r": 8}}))
    record = read_record(tmp_path)
    assert record.schema_version == 1 and record.family == "causal" and record.instruction == "Sum."
    assert (record.lineage.base_model, record.lineage.merged_from, record.lineage.adapter) == ("/m/base", "/p/lora",
                                                                                               "/p/lora")
    assert record.split.seed == 7 and record.split.normalize is True and record.extra["lora"] == {"r": 8}
    assert record.inheritable()["NO_REPEAT_NGRAM_SIZE"] == 3 and record.inheritable()["VAL_FRACTION"] == 0.2


def test_an_unreadable_record_is_one_clear_error(tmp_path):
    (tmp_path / "run_config.json").write_text("{not json")
    with pytest.raises(UserError, match="run_config.json is not valid JSON"):
        read_record(tmp_path)


def test_constants_after_the_imports_are_internal_not_settings(tmp_path):
    source = 'STEPS = 1  # steps\nimport os\nINTERNAL = os.sep\n'
    path = tmp_path / "stage.py"
    path.write_text(source)
    namespace = {"__file__": str(path)}
    exec(compile(source, str(path), "exec"), namespace)
    assert configure(namespace, []) == {"STEPS": 1}
    with pytest.raises(UserError, match="unknown setting --internal"):
        configure(namespace, ["--internal=x"])
