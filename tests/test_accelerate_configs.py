"""configs/accelerate/: each ready file is read by accelerate's own config loader and by its launch
command's validation (which merges the file into the launch arguments), and names only options
`accelerate launch` has. The GPU kinds (FSDP, DeepSpeed) are not run here (no GPUs): `make gpu-check`."""
from __future__ import annotations

import pytest

from conftest import REPO

CONFIGS = REPO / "configs" / "accelerate"
EXPECTED = {   # file -> (distributed type, machines, what launch turns on)
    "one_gpu.yaml": ("NO", 1, None),
    "ddp.yaml": ("MULTI_GPU", 1, "multi_gpu"),
    "fsdp.yaml": ("FSDP", 1, "use_fsdp"),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 1, "use_deepspeed"),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 1, "use_deepspeed"),
    "two_nodes.yaml": ("MULTI_GPU", 2, "multi_gpu"),
}


def test_the_folder_holds_exactly_the_documented_files():
    assert {p.name for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)
    recipes = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    for name in EXPECTED:
        assert f"configs/accelerate/{name}" in recipes, f"docs/recipes.md does not name {name}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_reads_and_validates_each_file(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    path = CONFIGS / name
    kind, machines, flag = EXPECTED[name]
    config = load_config_from_file(str(path))          # unknown top-level keys raise here
    assert config.distributed_type.value == kind and config.num_machines == machines
    parser = launch_command_parser()
    for section in (config.fsdp_config, config.deepspeed_config):
        for key in section:       # each nested key becomes a launch option of the same name
            assert f"--{key}" in parser._option_string_actions, f"{name}: {key} is not an accelerate launch option"
    args = parser.parse_args(["--config_file", str(path), "train_bart_lora.py"])
    _validate_launch_command(args)
    assert args.num_machines == machines and args.num_processes == config.num_processes
    if flag:
        assert getattr(args, flag)
    if name.startswith("deepspeed"):
        assert args.zero_stage == int(name[-6])
    if name == "fsdp.yaml":
        assert args.fsdp_version == 2
