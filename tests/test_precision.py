"""--precision=auto|fp32|bf16 on the stages that generate: the dtype the model really loads in, the
record of what was asked and used, one clear line where bf16 is not available (bf16 only falls
back to fp32 under auto), and no output written before that check."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import SAMPLES, error_line, files_under, run_stage

import eval_bart_lora
import inference_bart_lora
from finetuneflow.contract.errors import UserError
from finetuneflow.model import precision as P
from finetuneflow.model.precision import Precision, precision_for, resolve_precision

DATA = [f"--dataset={SAMPLES}", "--split=train", "--n_samples=3", "--max_new_tokens=6"]
NO_BF16_CPU = ("--precision=bf16: this CPU is treated as having no bf16 instructions (forced by FTF_CPU_BF16=0), "
               "so bf16 would be emulated and slower; use --precision=fp32 (or auto)")


# FTF_CPU_BF16 forces the CPU probe's answer both ways (never a fact of the CPU the tests run on)
@pytest.fixture
def no_bf16_cpu(monkeypatch):
    monkeypatch.setenv("FTF_CPU_BF16", "0")


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setenv("FTF_CPU_BF16", "1")


def one_thread(main, argv):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def test_explicit_choices_map_to_dtypes(bf16_cpu):
    assert resolve_precision("fp32", "cpu").dtype == torch.float32
    bf16 = resolve_precision("BF16", "cpu")
    assert bf16 == Precision("bf16", "bf16", "--precision=bf16 (forced by FTF_CPU_BF16=1)")
    assert bf16.dtype == torch.bfloat16
    with pytest.raises(UserError, match=r"^--precision='fp8' is not one of auto, fp32, bf16$"):
        resolve_precision("fp8", "cpu")


def test_bf16_without_cpu_support_is_one_line_and_auto_falls_back(no_bf16_cpu):
    with pytest.raises(UserError) as caught:
        resolve_precision("bf16", "cpu")
    assert str(caught.value) == NO_BF16_CPU
    auto = resolve_precision("auto", "cpu", family="causal")
    assert (auto.used, auto.reason) == ("fp32", "auto: this CPU is treated as having no bf16 instructions (forced "
                                                "by FTF_CPU_BF16=0)")


def test_auto_takes_bf16_only_for_families_measured_unchanged(bf16_cpu, monkeypatch):
    monkeypatch.setattr(P, "AUTO_CPU_BF16", frozenset({"causal"}))
    assert resolve_precision("auto", "cpu", family="causal").used == "bf16"
    assert resolve_precision("auto", "cpu", family="seq2seq").used == "fp32"
    monkeypatch.setattr(P, "AUTO_CPU_BF16", frozenset())
    assert resolve_precision("auto", "cpu", family="causal").used == "fp32"


def test_four_bit_weights_take_no_precision(bf16_cpu):
    assert resolve_precision("auto", "cpu", load_in_4bit=True).used == "4-bit nf4"
    with pytest.raises(UserError, match="LOAD_IN_4BIT=True loads 4-bit weights"):
        resolve_precision("bf16", "cpu", load_in_4bit=True)


def test_exported_models_keep_their_own_precision(tmp_path):
    gguf = tmp_path / "model-q8_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    assert precision_for(str(gguf), "auto", "cpu").used == "runtime"
    with pytest.raises(UserError, match=r"is a llama\.cpp model: its precision was fixed when it was exported"):
        precision_for(str(gguf), "fp32", "cpu")


def test_the_cpu_probe_is_forced_both_ways_or_detected(monkeypatch):
    monkeypatch.setenv("FTF_CPU_BF16", "1")
    assert P.cpu_bf16() == P.CpuBf16(True, None, forced=True) and P.cpu_bf16().source == "forced by FTF_CPU_BF16=1"
    monkeypatch.setenv("FTF_CPU_BF16", "0")
    assert not P.cpu_bf16().native and P.cpu_bf16().source == "forced by FTF_CPU_BF16=0"
    monkeypatch.setenv("FTF_CPU_BF16", "yes")
    with pytest.raises(UserError, match=r"^FTF_CPU_BF16='yes': use 1 .* or 0"):
        P.cpu_bf16()
    monkeypatch.delenv("FTF_CPU_BF16")
    detected = P.cpu_bf16()
    assert not detected.forced and detected.native == (detected.feature is not None)


@pytest.mark.parametrize("feature", [None, "avx512_bf16"])
def test_detected_answers_name_what_was_found(monkeypatch, feature):
    monkeypatch.delenv("FTF_CPU_BF16", raising=False)
    monkeypatch.setattr(P, "_detected_feature", lambda: feature)
    if feature:
        assert resolve_precision("bf16", "cpu").reason == "--precision=bf16 (avx512_bf16)"
        return
    with pytest.raises(UserError) as caught:
        resolve_precision("bf16", "cpu")
    assert str(caught.value) == ("--precision=bf16: this CPU has no bf16 instructions (avx512_bf16 / amx_bf16), so "
                                 "bf16 would be emulated and slower; use --precision=fp32 (or auto)")
    assert resolve_precision("auto", "cpu").reason == "auto: this CPU has no bf16 instructions"


def test_eval_in_bf16_loads_bf16_and_records_it(tiny_models, tmp_path, bf16_cpu):
    summary = one_thread(eval_bart_lora.main, [f"--model={tiny_models['llama']}", *DATA, "--precision=bf16",
                                               f"--output_dir={tmp_path}", "--tag=b"])
    assert summary["model"]["dtype"] == "bfloat16"
    assert summary["model"]["precision"] == {"requested": "bf16", "used": "bf16", "dtype": "bfloat16",
                                             "reason": "--precision=bf16 (forced by FTF_CPU_BF16=1)"}
    record = json.loads((tmp_path / "b_run_config.json").read_text())
    assert record["dtype"] == "bfloat16" and record["precision"]["used"] == "bf16"
    assert record["config"]["PRECISION"] == "bf16"


def test_eval_auto_on_cpu_records_fp32_and_why(tiny_models, tmp_path, bf16_cpu):
    summary = one_thread(eval_bart_lora.main, [f"--model={tiny_models['bart']}", *DATA, f"--output_dir={tmp_path}"])
    assert summary["model"]["dtype"] == "float32" and summary["model"]["precision"]["requested"] == "auto"
    assert summary["model"]["precision"]["reason"].startswith("auto: fp32 for seq2seq models on a CPU")


@pytest.mark.parametrize("stage", ["eval", "inference"])
def test_bf16_refused_before_anything_is_written(stage, tiny_models, tmp_path, no_bf16_cpu):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError) as caught:
        if stage == "eval":
            eval_bart_lora.main([f"--model={tiny_models['llama']}", *DATA, "--precision=bf16",
                                 f"--output_dir={out}"])
        else:
            inference_bart_lora.main([f"--model={tiny_models['llama']}", f"--input_file={SAMPLES}",
                                      "--precision=bf16", f"--output_file={out / 's.jsonl'}"])
    assert str(caught.value) == NO_BF16_CPU
    assert files_under(out) == set()


def test_inference_records_precision(tiny_models, tmp_path):
    out = tmp_path / "s.jsonl"
    one_thread(inference_bart_lora.main, [f"--model={tiny_models['llama']}", "--text=A: hi\\nB: hello there",
                                          "--max_new_tokens=4", "--precision=fp32", f"--output_file={out}"])
    record = json.loads(out.with_name("s.jsonl.run_config.json").read_text())
    assert record["dtype"] == "float32"
    assert record["precision"] == {"requested": "fp32", "used": "fp32", "reason": "--precision=fp32"}


def test_a_bad_precision_is_one_error_line(tiny_models, project):
    result = run_stage("eval_bart_lora.py", f"--model={tiny_models['llama']}", *DATA, "--precision=half",
                       root=project, check=False)
    assert result.returncode == 2
    assert "PRECISION" in error_line(result) and "auto" in error_line(result)
    assert not (project / "metrics").exists()


def test_in_training_generation_runs_in_fp32_unless_asked_otherwise(tiny_models, tmp_path, bf16_cpu, monkeypatch):
    """Under bf16 autocast training, the evaluations' summaries are generated in fp32 (as the
    evaluation stage generates them), so checkpoint selection sees what eval_bart_lora.py will see;
    --eval_precision=autocast generates under the training autocast."""
    import importlib.util
    from conftest import REPO
    from finetuneflow.train import trainer_core
    seen, original = [], trainer_core.summarize

    def watching(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_core, "summarize", watching)
    spec = importlib.util.spec_from_file_location("train_bart_lora", REPO / "train_bart_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    common = [f"--model={tiny_models['llama']}", f"--dataset={SAMPLES}", "--train_samples=8", "--val_samples=2",
              "--max_input_length=192", "--max_target_length=32", "--max_new_tokens=4", "--num_beams=1",
              "--max_steps=1", "--eval_steps=1", "--eval_on_start=False", "--precision=bf16",
              f"--cache_dir={tmp_path / 'cache'}"]
    metrics = one_thread(module.main, [*common, f"--output_dir={tmp_path / 'fp32'}"])
    assert metrics["precision"] == "bf16" and metrics["eval_precision"] == "fp32"
    assert seen == [False]                                  # the evaluation at step 1: autocast off
    seen.clear()
    metrics = one_thread(module.main, [*common, "--eval_precision=autocast", f"--output_dir={tmp_path / 'bf16'}"])
    assert metrics["eval_precision"] == "autocast" and seen == [True]
