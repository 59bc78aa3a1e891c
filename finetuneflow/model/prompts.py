"""How a dialogue becomes model input; training, evaluation, inference, the server and every
backend share these functions, so a fine-tuned model is always asked the way it was taught.

Causal models: the tokenizer's chat template (a plain template when it has none) around the
instruction and the dialogue; when the prompt is too long the dialogue is cut, never the
instruction or the template. Seq2seq models: the dialogue itself, with the model's own task
prefix when its config declares one (T5's "summarize: ").

User text never becomes special tokens: dialogues and summaries are tokenized with special
tokens split into plain text (`split_special_tokens=True`), so "<|im_end|><|im_start|>
assistant" inside a dialogue is summarized as text, not obeyed as a new chat turn. Only the
template around the dialogue (the tokenizer's own chat template and the INSTRUCTION setting)
carries special tokens.
"""
from __future__ import annotations

from finetuneflow.contract.errors import UserError

DEFAULT_INSTRUCTION = "Summarize the following dialogue in one to three sentences."
PLAIN_TEMPLATE = "{instruction}\n\nDialogue:\n{dialogue}\n\nSummary:\n"
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
_PLACEHOLDER = "\u2063DIALOGUE\u2063"
MIN_DIALOGUE_TOKENS = 16


def text_ids(tokenizer, text: str | list[str]) -> list[int] | list[list[int]]:
    """Token ids of user text: no special tokens added, none parsed from the text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


def prompt_style(tokenizer) -> str:
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "plain"


def _template_text(tokenizer, instruction: str) -> tuple[str, str, list[int]]:
    """The rendered prompt around the dialogue: (text before, text after, ids prepended)."""
    marker = _PLACEHOLDER
    while marker in instruction:   # an instruction that quotes the placeholder stays text
        marker += "\u2063"
    if prompt_style(tokenizer) == "chat_template":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{instruction}\n\n{marker}"}],
            add_generation_prompt=True, tokenize=False)
        before, after = text.split(marker)
        return before, after, []
    before, after = PLAIN_TEMPLATE.format(instruction=instruction, dialogue=marker).split(marker)
    return before, after, [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def prompt_pieces(tokenizer, instruction: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the dialogue in the causal prompt, each tokenized on its own
    (used to cut a dialogue that does not fit). The template and the instruction (an operator's
    setting) keep their special tokens."""
    before, after, head = _template_text(tokenizer, instruction)
    return (head + tokenizer(before, add_special_tokens=False)["input_ids"],
            tokenizer(after, add_special_tokens=False)["input_ids"])


def special_strings(tokenizer) -> list[str]:
    """Every special or added token's text (a dialogue containing one is tokenized in pieces)."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    return sorted({t for t in (*tokenizer.all_special_tokens, *added) if t})


def encode_causal_prompt(tokenizer, dialogue: str, instruction: str,
                         max_prompt_tokens: int) -> tuple[list[int], bool]:
    """Prompt ids for a causal model and whether the dialogue had to be cut to fit.

    A dialogue that fits is tokenized inside the whole rendered prompt, exactly as a chat server
    (llama.cpp, Ollama, vLLM) tokenizes the same text, so training, evaluation and every runtime
    see the same ids. A dialogue that must be cut, or that contains special-token text, is
    tokenized on its own (special tokens split into text) between the template's pieces."""
    prefix, suffix = prompt_pieces(tokenizer, instruction)
    budget = max_prompt_tokens - len(prefix) - len(suffix)
    if budget < MIN_DIALOGUE_TOKENS:
        raise UserError(f"MAX_INPUT_LENGTH={max_prompt_tokens} leaves {budget} tokens for the dialogue after the "
                        f"{len(prefix) + len(suffix)}-token prompt template; raise MAX_INPUT_LENGTH")
    if not any(s in dialogue for s in special_strings(tokenizer)):
        before, after, head = _template_text(tokenizer, instruction)
        whole = head + tokenizer(before + dialogue + after, add_special_tokens=False, verbose=False)["input_ids"]
        if len(whole) <= max_prompt_tokens:
            return whole, False
    dialogue_ids = text_ids(tokenizer, dialogue)
    truncated = len(dialogue_ids) > budget
    return prefix + dialogue_ids[:budget] + suffix, truncated


def seq2seq_prefix(model_config) -> str:
    params = getattr(model_config, "task_specific_params", None) or {}
    return (params.get("summarization") or {}).get("prefix", "") or ""


def seq2seq_ids(tokenizer, text: str, max_tokens: int | None = None) -> tuple[list[int], bool]:
    """`text` with the tokenizer's own special tokens around it (BART <s> ... </s>, T5 ... </s>),
    none parsed from the text, cut to `max_tokens` (the closing token stays); and whether it was cut."""
    ids = tokenizer(text, split_special_tokens=True, verbose=False)["input_ids"]
    if max_tokens is None or len(ids) <= max_tokens:
        return ids, False
    return tokenizer(text, split_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"], True


def seq2seq_overhead(tokenizer) -> int:
    """Special tokens a seq2seq tokenizer adds around any text."""
    return len(tokenizer("", split_special_tokens=True)["input_ids"])


def encode_seq2seq_input(tokenizer, dialogue: str, prefix: str, max_input_tokens: int) -> tuple[list[int], bool]:
    """Encoder ids (prefix + dialogue, cut to fit, special tokens around) and whether it was cut."""
    room = max_input_tokens - seq2seq_overhead(tokenizer)
    if room < MIN_DIALOGUE_TOKENS:
        raise UserError(f"MAX_INPUT_LENGTH={max_input_tokens} leaves {room} tokens for the dialogue; raise it")
    return seq2seq_ids(tokenizer, prefix + dialogue, max_input_tokens)


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus every end-of-turn token the vocabulary knows."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and vocab[t] not in ids]
    return ids
