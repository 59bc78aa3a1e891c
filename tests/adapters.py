"""Build an adapter folder the way train_bart_lora.py writes it (the ADAPTER FOLDER CONTRACT),
without training: LoRA weights are random and non-zero (`init_lora_weights=False`), so the
adapter really changes the model's outputs and merge parity is a meaningful check.

    from tests.adapters import make_adapter
    folder = make_adapter(tiny_models["bart"], tmp_path / "lora")
"""
from __future__ import annotations

from pathlib import Path

import torch

from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.record import Lineage, RunRecord, Split, write_record
from finetuneflow.model.family import SEQ2SEQ
from finetuneflow.model.loading import load_model
from finetuneflow.model.prompts import DEFAULT_INSTRUCTION, prompt_style

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples" / "dialogues.jsonl"
TARGETS = {"seq2seq": ["q_proj", "v_proj"], "causal": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def make_adapter(base: str | Path, out_dir: str | Path, seed: int = 0, r: int = 4, alpha: int = 8,
                 generation: dict | None = None, max_input_length: int = 256, load_in_4bit: bool = False,
                 instruction: str = DEFAULT_INSTRUCTION, dataset: str | Path = SAMPLES,
                 extra: dict | None = None, strength: float | None = None) -> Path:
    """Save a LoRA adapter for `base` (a local model folder) plus tokenizer and run_config.json
    into `out_dir`; returns `out_dir`. `extra` updates the run_config's top-level keys.
    `strength` scales LoRA B (None: 25 for the tiny BART, whose greedy output a weaker adapter
    does not change; 2 for the tiny Llama, where larger values blow up activations and fp32
    rounding alone reaches the 1e-3 parity tolerance)."""
    from peft import LoraConfig, TaskType, get_peft_model
    out = Path(out_dir)
    loaded = load_model(str(base), device="cpu", dtype=torch.float32, for_training=True)
    torch.manual_seed(seed)
    task = TaskType.SEQ_2_SEQ_LM if loaded.family == SEQ2SEQ else TaskType.CAUSAL_LM
    lora = {"r": r, "alpha": alpha, "dropout": 0.0, "target_modules": TARGETS[loaded.family]}
    config = LoraConfig(task_type=task, r=r, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=lora["target_modules"], init_lora_weights=False)
    model = get_peft_model(loaded.model, config)
    strength = strength if strength is not None else (25.0 if loaded.family == SEQ2SEQ else 2.0)
    with torch.no_grad():  # large enough to change greedy outputs of a tiny random model
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(strength)
    model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    if generation is None:
        generation = ({"num_beams": 2, "max_new_tokens": 24, "min_new_tokens": 2, "no_repeat_ngram_size": 3,
                       "length_penalty": 1.0} if loaded.family == SEQ2SEQ else
                      {"num_beams": 1, "max_new_tokens": 24, "min_new_tokens": None, "no_repeat_ngram_size": None,
                       "length_penalty": None})
    record = RunRecord(
        "train_bart_lora", family=loaded.family, instruction=instruction,
        prompt_style=prompt_style(loaded.tokenizer) if loaded.family != SEQ2SEQ else "seq2seq",
        max_input_length=max_input_length, max_target_length=64, load_in_4bit=load_in_4bit,
        generation=GenerationSettings.from_record(generation), backend="transformers",
        lineage=Lineage(base_model=str(Path(base).resolve()), adapter=str(out)),
        split=Split(source=str(dataset)), extra={"lora": lora, **(extra or {})})
    settings = {"MODEL": str(base), "DATASET": str(dataset), "LORA_R": r, "LORA_ALPHA": alpha,
                "MAX_INPUT_LENGTH": max_input_length, "LOAD_IN_4BIT": load_in_4bit,
                **{k.upper(): v for k, v in generation.items()}}
    write_record(out, record, settings, [])
    return out
