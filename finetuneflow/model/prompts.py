"""How a dialogue becomes model input; training and generation share these functions, so a
fine-tuned model is always asked the way it was taught.

Causal models: the tokenizer's chat template (a plain template when it has none) around the
instruction and the dialogue; when the prompt is too long the dialogue is cut, never the
instruction or the template. Seq2seq models: the dialogue itself, with the model's own task
prefix when its config declares one (T5's "summarize: ").
"""
from __future__ import annotations

from finetuneflow.contract.errors import UserError

DEFAULT_INSTRUCTION = "Summarize the following dialogue in one to three sentences."
PLAIN_TEMPLATE = "{instruction}\n\nDialogue:\n{dialogue}\n\nSummary:\n"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
_PLACEHOLDER = "\u2063DIALOGUE\u2063"


def prompt_style(tokenizer) -> str:
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "plain"


def _prompt_pieces(tokenizer, instruction: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the dialogue in the full prompt."""
    if prompt_style(tokenizer) == "chat_template":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{instruction}\n\n{_PLACEHOLDER}"}],
            add_generation_prompt=True, tokenize=False)
        before, after = text.split(_PLACEHOLDER)
        prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
    else:
        before, after = PLAIN_TEMPLATE.format(instruction=instruction, dialogue=_PLACEHOLDER).split(_PLACEHOLDER)
        prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            prefix = [tokenizer.bos_token_id] + prefix
    return prefix, tokenizer(after, add_special_tokens=False)["input_ids"]


def encode_causal_prompt(tokenizer, dialogue: str, instruction: str,
                         max_prompt_tokens: int) -> tuple[list[int], bool]:
    """Prompt ids for a causal model and whether the dialogue had to be cut to fit."""
    prefix, suffix = _prompt_pieces(tokenizer, instruction)
    dialogue_ids = tokenizer(dialogue, add_special_tokens=False)["input_ids"]
    budget = max_prompt_tokens - len(prefix) - len(suffix)
    if budget < 16:
        raise UserError(f"MAX_INPUT_LENGTH={max_prompt_tokens} leaves {budget} tokens for the dialogue "
                         f"after the {len(prefix) + len(suffix)}-token prompt template")
    truncated = len(dialogue_ids) > budget
    return prefix + dialogue_ids[:budget] + suffix, truncated


def seq2seq_prefix(model_config) -> str:
    params = getattr(model_config, "task_specific_params", None) or {}
    return (params.get("summarization") or {}).get("prefix", "") or ""


def encode_seq2seq_input(tokenizer, dialogue: str, prefix: str, max_input_tokens: int) -> tuple[list[int], bool]:
    ids = tokenizer(prefix + dialogue, add_special_tokens=True)["input_ids"]
    if len(ids) <= max_input_tokens:
        return ids, False
    cut = tokenizer(prefix + dialogue, truncation=True, max_length=max_input_tokens)["input_ids"]
    return cut, True


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus every end-of-turn token the vocabulary knows."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and vocab[t] not in ids]
    return ids
