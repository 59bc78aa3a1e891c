"""The two model families as strategies: everything that differs between a seq2seq model (BART,
T5) and a decoder-only model (Llama, Qwen, Phi, SmolLM) lives here, once.

A `Family` is a `str` ("seq2seq" / "causal") so records, JSON and comparisons keep working, and
it owns the family's rules:

* encoding a dialogue for generation (prompt template or task prefix, cut to fit, user text never
  parsed into special tokens) and counting input tokens the same way (for long-input windows);
* the padding side for generation and how the new tokens are cut from `generate()`'s output;
* teacher-forced inputs (prompt + reference summary) for parity checks and training examples
  (causal: loss on the summary + EOS only; seq2seq: `labels`), and preference pairs (the same
  input with a chosen and a rejected target) with the objectives TRL trains for the family;
* the LoRA task type and default targets, and the decoding defaults: `resolve_generation` puts a
  request (contract/decoding.py `GenerationSettings`, already filled from the upstream run record)
  over them once, with every limit a backend needs worked out (`ResolvedGeneration`).
"""
from __future__ import annotations

from dataclasses import dataclass

from finetuneflow.contract import architectures as arch
from finetuneflow.contract.decoding import MBR_FIELDS, GenerationSettings, Mbr, ResolvedGeneration, Sampling
from finetuneflow.contract.errors import UserError
from finetuneflow.model.prompts import (encode_causal_prompt, encode_seq2seq_input, prompt_pieces, seq2seq_ids,
                                        seq2seq_overhead, stop_token_ids, text_ids)

CAUSAL_DEFAULTS = {"num_beams": 1, "max_new_tokens": 128}   # greedy; a summary fits in 128 tokens
# A seq2seq config without max_length (rare: transformers' GenerationConfig sets 20): new tokens + 1
# (CTranslate2's own default decoding length).
SEQ2SEQ_MAX_LENGTH = 256


@dataclass(frozen=True)
class PromptSpec:
    """What surrounds a dialogue: the causal instruction, or the seq2seq task prefix."""
    instruction: str
    prefix: str = ""


class Family(str):
    padding_side = "right"
    lora_task_type = ""
    auto_class = ""
    preference_objectives: tuple[str, ...] = ()   # OBJECTIVE values TRL's preference trainers run for the family
    preference_note = ""                           # why the others are missing

    # -- generation inputs -------------------------------------------------------------------
    def encode(self, tokenizer, dialogue: str, prompt: PromptSpec, limit: int) -> tuple[list[int], bool]:
        """Input ids for one dialogue, at most `limit` tokens, and whether the dialogue was cut."""
        raise NotImplementedError

    def input_overhead(self, tokenizer, prompt: PromptSpec) -> int:
        """Tokens an input needs besides the dialogue's own."""
        raise NotImplementedError

    def count_inputs(self, tokenizer, texts: list[str], prompt: PromptSpec) -> list[int]:
        """Exact input tokens each text needs (before any cut)."""
        if not texts:
            return []
        overhead = self.input_overhead(tokenizer, prompt)
        return [overhead + len(ids) for ids in text_ids(tokenizer, [self.dialogue_text(t, prompt) for t in texts])]

    def dialogue_text(self, text: str, prompt: PromptSpec) -> str:
        return text

    # -- generation outputs ------------------------------------------------------------------
    def new_tokens(self, output, prompt_width: int):
        """The generated part of `generate()`'s output rows."""
        raise NotImplementedError

    def generation_defaults(self, generation_config) -> dict:
        """Decoding settings when the caller sets none: the model's own config (seq2seq) or greedy
        with 128 new tokens (causal: their configs are tuned for chat, not summaries)."""
        raise NotImplementedError

    def resolve_generation(self, generation_config, requested: GenerationSettings | None = None,
                           sampling: Sampling | None = None) -> ResolvedGeneration:
        """The request over this family's defaults: what a generation call really uses. A
        `max_new_tokens` / `min_new_tokens` asked for replaces the model's own max_length /
        min_length; sampling, DECODING=greedy and DECODING=mbr decode with one beam (a model whose
        config asks for beams too); DECODING=beam needs beams; MBR's knobs left at None take
        contract/decoding.py MBR_DEFAULTS (they do not depend on the family)."""
        requested = requested or GenerationSettings()
        values = self.generation_defaults(generation_config)
        asked = {k: v for k, v in requested.overrides().items() if k != "decoding" and k not in MBR_FIELDS}
        values.update(asked)
        if "max_new_tokens" in asked:
            values["max_length"] = None
        if "min_new_tokens" in asked:
            values["min_length"] = None
        decoding = requested.decoding
        if sampling is not None and decoding == "mbr":
            raise UserError("sampling (temperature > 0) and DECODING=mbr are two different decodings; ask for one")
        if sampling is not None or decoding in ("greedy", "mbr"):
            values["num_beams"] = 1
        values["num_beams"] = int(values.get("num_beams") or 1)
        if decoding == "beam" and values["num_beams"] < 2:
            raise UserError("DECODING=beam, but this model's own config decodes with one beam; set --num_beams=4 "
                            "(or another number of beams), or use --decoding=greedy")
        max_new, min_new = self.new_token_limits(values)
        return ResolvedGeneration(**values, max_new=max_new, min_new=min(min_new, max_new), sampling=sampling,
                                  decoding=decoding or ("beam" if values["num_beams"] > 1 else "greedy"),
                                  mbr=Mbr.resolve(requested) if decoding == "mbr" else None)

    def new_token_limits(self, values: dict) -> tuple[int, int]:
        """(at most, at least) new tokens for resolved `values`."""
        return int(values.get("max_new_tokens") or CAUSAL_DEFAULTS["max_new_tokens"]), \
            int(values.get("min_new_tokens") or 0)

    def default_input_limit(self, max_positions: int, max_new_tokens: int) -> int:
        """Input tokens when MAX_INPUT_LENGTH is not given (`max_new_tokens`: the resolved `max_new`)."""
        return max_positions

    # -- teacher forcing and training --------------------------------------------------------
    def training_example(self, tokenizer, prompt: PromptSpec, dialogue: str, summary: str, max_input: int,
                         max_target: int) -> dict:
        """input_ids / attention_mask / labels for one row, plus whether input or target was cut."""
        raise NotImplementedError

    def teacher_forced(self, tokenizer, prompt_ids: list[int], summary: str, max_target: int = 128) -> dict:
        """{"input_ids", "labels"} lists for scoring a reference summary after `prompt_ids`; `labels`
        marks with -100 the positions that are not summary tokens."""
        example = self.training_example_from_ids(tokenizer, prompt_ids, summary, max_target)
        return {"input_ids": example["input_ids"], "labels": example["labels"]}

    def training_example_from_ids(self, tokenizer, prompt_ids: list[int], summary: str, max_target: int) -> dict:
        raise NotImplementedError

    def preference_example(self, tokenizer, prompt: PromptSpec, dialogue: str, chosen: str, rejected: str,
                           max_input: int, max_target: int) -> dict:
        """One preference pair as ids: the input exactly as `training_example` encodes it
        (`prompt_ids`: the causal prompt, or the seq2seq encoder input) and each summary as the
        target the model learns (`chosen_ids`, `rejected_ids`: causal summary + EOS, seq2seq labels)."""
        good = self.training_example(tokenizer, prompt, dialogue, chosen, max_input, max_target)
        prompt_ids, chosen_ids = self.split_example(good)
        bad = self.training_example_from_ids(tokenizer, prompt_ids, rejected, max_target)
        return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": self.split_example(bad)[1],
                "input_truncated": good["input_truncated"],
                "target_truncated": good["target_truncated"] or bad["target_truncated"]}

    def split_example(self, example: dict) -> tuple[list[int], list[int]]:
        """(input ids, target ids) of a training example."""
        raise NotImplementedError

    def default_lora_targets(self, model_type: str, linear_names=None) -> list[str] | None:
        return arch.default_lora_targets(self, model_type, linear_names)


class Seq2SeqFamily(Family):
    padding_side = "right"
    lora_task_type = "SEQ_2_SEQ_LM"
    auto_class = "AutoModelForSeq2SeqLM"
    preference_objectives = ("orpo",)
    preference_note = "TRL's DPOTrainer trains decoder-only models only (its ORPOTrainer takes encoder-decoder ones)"

    def encode(self, tokenizer, dialogue, prompt, limit):
        return encode_seq2seq_input(tokenizer, dialogue, prompt.prefix, limit)

    def input_overhead(self, tokenizer, prompt):
        return seq2seq_overhead(tokenizer)

    def dialogue_text(self, text, prompt):
        return prompt.prefix + text

    def new_tokens(self, output, prompt_width):
        return output[:, 1:]   # the decoder start token

    def generation_defaults(self, generation_config) -> dict:
        c = generation_config
        return {"num_beams": c.num_beams, "max_new_tokens": c.max_new_tokens, "max_length": c.max_length,
                "min_length": c.min_length, "no_repeat_ngram_size": c.no_repeat_ngram_size,
                "length_penalty": c.length_penalty}

    def new_token_limits(self, values):
        """transformers counts the decoder start token in a seq2seq model's max_length/min_length."""
        max_new = values.get("max_new_tokens") or max(1, (values.get("max_length") or SEQ2SEQ_MAX_LENGTH) - 1)
        min_new = values.get("min_new_tokens")
        if min_new is None:
            min_new = max(0, (values.get("min_length") or 0) - 1)
        return int(max_new), int(min_new)

    def labels(self, tokenizer, summary: str, max_target: int) -> tuple[list[int], bool]:
        return seq2seq_ids(tokenizer, summary, max_target)

    def training_example(self, tokenizer, prompt, dialogue, summary, max_input, max_target):
        ids, input_cut = self.encode(tokenizer, dialogue, prompt, max_input)
        example = self.training_example_from_ids(tokenizer, ids, summary, max_target)
        return {**example, "input_truncated": input_cut}

    def training_example_from_ids(self, tokenizer, prompt_ids, summary, max_target):
        labels, target_cut = self.labels(tokenizer, summary, max_target)
        return {"input_ids": prompt_ids, "attention_mask": [1] * len(prompt_ids), "labels": labels,
                "target_truncated": target_cut}

    def split_example(self, example):
        return list(example["input_ids"]), list(example["labels"])


class CausalFamily(Family):
    padding_side = "left"
    lora_task_type = "CAUSAL_LM"
    auto_class = "AutoModelForCausalLM"
    preference_objectives = ("dpo", "orpo")

    def encode(self, tokenizer, dialogue, prompt, limit):
        return encode_causal_prompt(tokenizer, dialogue, prompt.instruction, limit)

    def input_overhead(self, tokenizer, prompt):
        prefix, suffix = prompt_pieces(tokenizer, prompt.instruction)
        return len(prefix) + len(suffix)

    def count_inputs(self, tokenizer, texts, prompt):
        """Exact: the whole rendered prompt is tokenized (the seams merge differently than pieces)."""
        return [len(encode_causal_prompt(tokenizer, t, prompt.instruction, 1 << 30)[0]) for t in texts]

    def new_tokens(self, output, prompt_width):
        return output[:, prompt_width:]   # the output repeats the prompt

    def generation_defaults(self, generation_config) -> dict:
        return dict(CAUSAL_DEFAULTS)

    def default_input_limit(self, max_positions, max_new_tokens):
        # the prompt and the new tokens share the context, so the new tokens are kept free
        return max_positions - int(max_new_tokens)

    def training_example(self, tokenizer, prompt, dialogue, summary, max_input, max_target):
        ids, input_cut = self.encode(tokenizer, dialogue, prompt, max_input)
        return {**self.training_example_from_ids(tokenizer, ids, summary, max_target), "input_truncated": input_cut}

    def training_example_from_ids(self, tokenizer, prompt_ids, summary, max_target):
        """prompt + summary + EOS with the loss on the summary and EOS only (EOS survives any cut,
        and stays a target even when pad == eos)."""
        stops = stop_token_ids(tokenizer)
        if not stops:
            raise UserError("the tokenizer has no EOS token, so a causal model could not learn where a summary ends")
        summary_ids = text_ids(tokenizer, summary)
        room = max_target - 1
        target = summary_ids[:room] + [stops[0]]
        ids = prompt_ids + target
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt_ids) + target,
                "target_truncated": len(summary_ids) > room}

    def split_example(self, example):
        """The prompt is every position without a label; the target is the rest (summary + EOS)."""
        width = sum(1 for label in example["labels"] if label == -100)
        return list(example["input_ids"][:width]), list(example["input_ids"][width:])


SEQ2SEQ = Seq2SeqFamily(arch.SEQ2SEQ)
CAUSAL = CausalFamily(arch.CAUSAL)
FAMILIES = {SEQ2SEQ: SEQ2SEQ, CAUSAL: CAUSAL}


def family_of(config_or_name) -> Family:
    """The family of a config (object or dict) or of a recorded family name."""
    if isinstance(config_or_name, str):
        if config_or_name not in FAMILIES:
            raise UserError(f"unknown model family {config_or_name!r} (expected seq2seq or causal)")
        return FAMILIES[config_or_name]
    return FAMILIES[arch.family_name(config_or_name)]
