"""Hostile input for the ship stages (merge_bart_lora.py, post_merge_cleanup.py, export_gguf.py,
import_gguf.py), run as a user runs them, in a project that is a git repository with the user's
own files. Every attack ends with exactly one `error:` line, exit code 2, and every file of the
project (its .git, data, notes, models and earlier outputs) unchanged:

* outputs at places a stage must never write (the project root, a folder above it, a folder of
  the user's files, an input, the folder holding an input), with --OVERWRITE=True;
* the hostile probe's exact reproductions (issue 11);
* a path-like NAME, an existing file where an output folder goes, a user's file where a GGUF or
  one of its sidecars goes, an unwritable folder;
* corrupt or wrong inputs: bad config JSON, truncated safetensors, pickled weights without
  opt-in, an already-quantized (4-bit) model, a Llama adapter onto a BART base, a truncated or
  non-GGUF file;
* settings out of range.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_stage
from hostile import assert_refused, protected_outputs, snapshot, unwritable, user_project

ENV = {"OMP_NUM_THREADS": "1"}


@dataclass
class Project:
    root: Path
    notes: Path
    base: Path        # models/tiny-llama
    bart: Path        # models/tiny-bart
    adapter: Path     # ft_outputs/lora (a Llama adapter)
    merged: Path      # ft_outputs/merged (a full model folder)
    gguf: Path        # models/model.gguf


def write_gguf(path: Path) -> Path:
    """A small, valid GGUF file (metadata and one tensor)."""
    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def templates(tiny_models, tmp_path_factory) -> dict[str, Path]:
    from adapters import make_adapter
    root = tmp_path_factory.mktemp("hostile_templates")
    return {"adapter": make_adapter(tiny_models["llama"], root / "lora"), "gguf": write_gguf(root / "model.gguf")}


@pytest.fixture
def project(tmp_path, tiny_models, templates) -> Project:
    user = user_project(tmp_path)
    root = user.root
    base = Path(shutil.copytree(tiny_models["llama"], root / "models" / "tiny-llama"))
    bart = Path(shutil.copytree(tiny_models["bart"], root / "models" / "tiny-bart"))
    adapter = Path(shutil.copytree(templates["adapter"], root / "ft_outputs" / "lora"))
    merged = Path(shutil.copytree(tiny_models["llama"], root / "ft_outputs" / "merged"))
    gguf = Path(shutil.copy(templates["gguf"], root / "models" / "model.gguf"))
    return Project(root, user.notes, base, bart, adapter, merged, gguf)


# Each stage: its script, the arguments naming its inputs, and those inputs.
STAGES = {
    "merge": ("merge_bart_lora.py", lambda p: [f"--adapter={p.adapter}", f"--base_model={p.base}"],
              lambda p: [p.adapter, p.base]),
    "cleanup": ("post_merge_cleanup.py", lambda p: [f"--model={p.merged}"], lambda p: [p.merged]),
    "export_ct2": ("export_gguf.py", lambda p: [f"--model={p.merged}", "--format=ct2"], lambda p: [p.merged]),
    "import": ("import_gguf.py", lambda p: [f"--gguf={p.gguf}"], lambda p: [p.gguf]),
}
LOCATIONS = ["project root", "folder above the root", "user's folder", "input 0", "folder holding input 0"]
LOCATION_CASES = [(stage, case) for stage in STAGES for case in LOCATIONS] + [("merge", "input 1"),
                                                                             ("merge", "folder holding input 1")]


def refused(project: Project, script: str, *args: str, message: str) -> str:
    """Run the stage; assert it refused with `message`, changed no file of the project and wrote
    none (nothing half-written)."""
    before = snapshot(project.root)
    result = run_stage(script, *args, root=project.root, check=False, env=ENV)
    line = assert_refused(result, message, before, project.root)
    assert sorted(snapshot(project.root)) == sorted(before), "the refused run wrote files"
    return line


@pytest.mark.parametrize("stage,case", LOCATION_CASES, ids=[f"{s}-{c}" for s, c in LOCATION_CASES])
def test_outputs_never_land_on_protected_places(project, stage, case):
    script, args, inputs = STAGES[stage]
    where, message = protected_outputs(project, inputs(project))[case]
    refused(project, script, *args(project), f"--output_dir={where}", "--overwrite=True", message=message)


PROBE_REPRODUCTIONS = {
    # issue 11, finding 1, as the probe typed them
    "cleanup --output_dir=. (deleted the repository)":
        ("post_merge_cleanup.py", lambda p: [f"--merged_dir={p.merged}", "--output_dir=."], "is the project root"),
    "ct2 export into its source model":
        ("export_gguf.py", lambda p: ["--format=ct2", f"--model={p.merged}", f"--output_dir={p.merged}"],
         "is an input of this run"),
    "merge OVERWRITE onto the base model":
        ("merge_bart_lora.py", lambda p: [f"--adapter={p.adapter}", f"--base_model={p.base}",
                                          f"--output_dir={p.base}", "--OVERWRITE=True"], "is an input of this run"),
    "merge OVERWRITE onto the adapter's parent":
        ("merge_bart_lora.py", lambda p: [f"--adapter={p.adapter}", f"--base_model={p.base}",
                                          f"--output_dir={p.adapter.parent}", "--OVERWRITE=True"],
         "contains an input of this run"),
    "import into the folder holding the gguf":
        ("import_gguf.py", lambda p: [f"--gguf={p.gguf}", f"--output_dir={p.gguf.parent}", "--OVERWRITE=True"],
         "contains an input of this run"),
}


@pytest.mark.parametrize("case", list(PROBE_REPRODUCTIONS))
def test_the_probes_reproductions_are_refused(project, case):
    script, args, message = PROBE_REPRODUCTIONS[case]
    refused(project, script, *args(project), message=message)


# ----------------------------------------------------------------------------- names and files

@pytest.mark.parametrize("name,fmt", [("../../x", "gguf"), ("/tmp/evil", "gguf"), ("a/b", "ct2")])
def test_a_path_like_name_is_refused(project, name, fmt):
    refused(project, "export_gguf.py", f"--model={project.merged}", f"--format={fmt}", f"--name={name}",
            message=f"--NAME={name!r} must be a file name (letters, digits, . _ -), not a path")


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_existing_file_where_the_output_folder_goes(project, stage):
    script, args, _ = STAGES[stage]
    refused(project, script, *args(project), f"--output_dir={project.notes / 'todo.txt'}", "--overwrite=True",
            message="is a file, not a folder")


@pytest.mark.parametrize("case", ["the .gguf", "the Modelfile", "the deploy report", "a folder named like the .gguf",
                                  "the project root", "inside the source model"])
def test_gguf_files_in_a_shared_folder_replace_only_their_own(project, case):
    """GGUF outputs are files in a shared folder: a file there that this stage did not write (no
    sidecar record names it) is never replaced; the folder itself is never a protected place."""
    shared = project.root / "ft_outputs" / "gguf"
    shared.mkdir()
    target, message = {
        "the .gguf": (shared / "merged-q8_0.gguf", "exists and was not written by export_gguf"),
        "the Modelfile": (shared / "merged-q8_0.Modelfile", "exists and was not written by export_gguf"),
        "the deploy report": (shared / "merged.deploy_report.html", "exists and was not written by export_gguf"),
        "a folder named like the .gguf": (shared / "merged-q8_0.gguf", "is a folder; give a file name"),
        "the project root": (None, "is the project root"),
        "inside the source model": (None, "is inside an input of this run"),
    }[case]
    if case == "a folder named like the .gguf":
        target.mkdir()
        (target / "mine.txt").write_text("mine")
    elif target is not None:
        target.write_text("the user's own file\n")
    output = {"the project root": ".", "inside the source model": str(project.merged)}.get(case, str(shared))
    refused(project, "export_gguf.py", f"--model={project.merged}", f"--output_dir={output}", message=message)


@pytest.mark.parametrize("case", ["a user's file", "a user's folder", "missing"])
def test_gate_eval_must_name_an_evaluation(project, case):
    """The deploy gate reads the evaluation GATE_EVAL names; anything else is refused before any work."""
    value, message = {"a user's file": (project.notes / "todo.txt", "is not an evaluation: pass a <tag>_eval.json"),
                      "a user's folder": (project.notes, "holds no <tag>_eval.json"),
                      "missing": (project.root / "metrics" / "x_eval.json", "does not exist")}[case]
    refused(project, "export_gguf.py", f"--model={project.merged}", f"--gate_eval={value}", message=message)


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_unwritable_output_folder(project, stage):
    script, args, _ = STAGES[stage]
    locked = unwritable(project.root / "locked")
    refused(project, script, *args(project), f"--output_dir={locked / 'out'}", message="is not writable")


# ----------------------------------------------------------------------------- corrupt and wrong inputs

def bad_json(path: Path) -> None:
    path.write_text('{"model_type": "llama", ')


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def pickled(folder: Path, name: str = "model.safetensors", to: str = "pytorch_model.bin") -> None:
    import torch
    from safetensors.torch import load_file
    torch.save(load_file(str(folder / name)), folder / to)
    (folder / name).unlink()


def quantized(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))


MODEL_FOLDER_ATTACKS = {
    "bad config JSON": (lambda m: bad_json(m / "config.json"), "config.json is not valid JSON"),
    "truncated safetensors": (lambda m: truncate(m / "model.safetensors"), "is not a readable safetensors file"),
    "pickled weights": (lambda m: pickled(m), "holds pickled weights (pytorch_model.bin)"),
    "a 4-bit saved model": (quantized, "holds already-quantized weights (bitsandbytes)"),
}
CORRUPT_CASES = [
    *[("merge", f"base: {k}") for k in MODEL_FOLDER_ATTACKS],
    ("merge", "adapter: bad adapter_config.json"), ("merge", "adapter: truncated weights"),
    ("merge", "adapter: pickled weights"), ("merge", "a Llama adapter onto a BART base"),
    *[("cleanup", k) for k in MODEL_FOLDER_ATTACKS], ("cleanup", "bad generation_config.json"),
    *[("export_gguf", k) for k in MODEL_FOLDER_ATTACKS], ("export_ct2", "truncated safetensors"),
    ("import", "not a GGUF file"), ("import", "an empty file"), ("import", "a truncated GGUF"), ("import", "a folder"),
]


def corrupt(project: Project, stage: str, case: str) -> tuple[list[str], str]:
    """Damage the project's input for (stage, case); returns (stage arguments, expected message)."""
    if stage == "merge":
        args = [f"--adapter={project.adapter}", f"--base_model={project.base}", "--output_dir=ft_outputs/m"]
        if case.startswith("base: "):
            damage, message = MODEL_FOLDER_ATTACKS[case[6:]]
            damage(project.base)
            return args, message
        if case == "a Llama adapter onto a BART base":
            return [f"--adapter={project.adapter}", f"--base_model={project.bart}", "--output_dir=ft_outputs/m"], \
                "is a CAUSAL_LM adapter but base"
        damage, message = {
            "adapter: bad adapter_config.json": (lambda: bad_json(project.adapter / "adapter_config.json"),
                                                 "adapter_config.json is not valid JSON"),
            "adapter: truncated weights": (lambda: truncate(project.adapter / "adapter_model.safetensors"),
                                           "adapter_model.safetensors is not a readable safetensors file"),
            "adapter: pickled weights": (lambda: pickled(project.adapter, "adapter_model.safetensors",
                                                         "adapter_model.bin"),
                                         "adapter_model.bin is a pickle, which can run code when loaded"),
        }[case]
        damage()
        return args, message
    if stage == "import":
        target = project.root / "models" / "broken.gguf"
        if case == "not a GGUF file":
            target.write_text("just text\n")
        elif case == "an empty file":
            target.write_bytes(b"")
        elif case == "a truncated GGUF":
            target.write_bytes(project.gguf.read_bytes()[:200])
        else:
            target.mkdir()
        message = {"not a GGUF file": "is not a GGUF file", "an empty file": "is not a GGUF file",
                   "a truncated GGUF": "cannot be read as GGUF", "a folder": "is a folder; pass the .gguf file"}[case]
        return [f"--gguf={target}", "--output_dir=ft_outputs/imported"], message
    if case == "bad generation_config.json":
        bad_json(project.merged / "generation_config.json")
        return [f"--model={project.merged}", "--output_dir=ft_outputs/clean"], "generation_config.json is unreadable"
    damage, message = MODEL_FOLDER_ATTACKS[case]
    damage(project.merged)
    extra = {"cleanup": ["--output_dir=ft_outputs/clean"], "export_gguf": ["--output_dir=ft_outputs/gguf"],
             "export_ct2": ["--format=ct2", "--output_dir=ft_outputs/ct2"]}[stage]
    return [f"--model={project.merged}", *extra], message


@pytest.mark.parametrize("stage,case", CORRUPT_CASES, ids=[f"{s}-{c}" for s, c in CORRUPT_CASES])
def test_corrupt_or_wrong_inputs_end_in_one_line(project, stage, case):
    script = STAGES["export_ct2" if stage.startswith("export") else stage][0]
    args, message = corrupt(project, stage, case)
    refused(project, script, *args, message=message)


@pytest.mark.parametrize("stage,setting", [("merge", "--parity_samples=0"), ("cleanup", "--verify_samples=0"),
                                           ("export_ct2", "--n_probes=0"), ("export_ct2", "--batch_size=-1"),
                                           ("import", "--tolerance=-1"), ("import", "--generate_tokens=-5")])
def test_settings_out_of_range(project, stage, setting):
    """VERIFY must verify: zero probes is not a verification."""
    script, args, _ = STAGES[stage]
    refused(project, script, *args(project), setting, message="out of range")


# ----------------------------------------------------------------------------- the deploy gate's settings

def legacy_imatrix(path: Path, width: int) -> Path:
    """An importance matrix in llama-imatrix's legacy .dat format with one entry of `width` inputs."""
    import struct
    name = b"blk.0.attn_q.weight"
    path.write_bytes(struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 1, width)
                     + struct.pack(f"<{width}f", *([1.0] * width)))
    return path


GATE_CASES = {
    "a text file as --imatrix": (lambda p: [f"--imatrix={(p.notes / 'todo.txt')}"],
                                 "is not an importance matrix written by llama-imatrix"),
    "a GGUF model as --imatrix": (lambda p: [f"--imatrix={p.gguf}"],
                                  "is not an importance matrix written by llama-imatrix (a GGUF file without"),
    "an --imatrix of another model": (lambda p: [f"--imatrix={legacy_imatrix(p.notes / 'other.dat', 999)}"],
                                      "was made for another model (blk.0.attn_q.weight has 999 inputs, the model 32)"),
    "a missing --imatrix file": (lambda p: ["--imatrix=notes/absent.imatrix"], "does not exist; pass a file written"),
    "an unknown type in the ladder": (lambda p: ["--outtype=auto", "--ladder=q8_0,q2_q"],
                                      "LADDER has 'q2_q', not a GGUF type this stage writes"),
    "auto with other types": (lambda p: ["--outtype=auto,q8_0"],
                              "OUTTYPE=auto chooses one type from LADDER; drop q8_0"),
    "auto without the gate": (lambda p: ["--outtype=auto", "--gate=off"], "OUTTYPE=auto picks the smallest type whose"),
}


@pytest.mark.parametrize("case", list(GATE_CASES))
def test_gate_and_ladder_settings_end_in_one_line(project, case):
    """Checked before anything is converted: one error line, exit 2, nothing written."""
    args, message = GATE_CASES[case]
    quantized = [] if any(a.startswith("--outtype") for a in args(project)) else ["--outtype=q4_k_m"]
    refused(project, "export_gguf.py", f"--model={project.merged}", "--output_dir=ft_outputs/gguf", *quantized,
            *args(project), message=message)


def test_a_port_already_taken_ends_in_one_line(project):
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = refused(project, "export_gguf.py", f"--model={project.merged}", "--output_dir=ft_outputs/gguf",
                       f"--server_port={port}", message=f"SERVER_PORT={port}: that port is already in use")
    assert line == (f"error: SERVER_PORT={port}: that port is already in use on 127.0.0.1; pick a free port or leave "
                    f"SERVER_PORT unset (the gate then takes a free one)")
