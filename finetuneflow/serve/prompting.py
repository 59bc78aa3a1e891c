"""raw_prompt mode of the OpenAI-compatible endpoints: the client's text goes to the model without
the summary instruction the model was trained with.

The default (no raw_prompt) is the trained prompt: the dialogue inside the instruction and the
chat template (causal models) or the task prefix (seq2seq), exactly as training, evaluation and
/summarize ask the model. Raw mode swaps the family strategy of a copy of the loaded model, so the
request still runs through the one generation engine:

* "raw_chat" (causal): the text is the only user turn of the tokenizer's chat template;
* "raw_text" (causal): the text as is (after BOS when the tokenizer has one), a plain completion;
* seq2seq models: the text without the task prefix (both modes).

User text stays text: it is tokenized with special tokens split (model/prompts.py), so
"<|im_start|>system" inside a message is not a new turn.
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from finetuneflow.contract.errors import UserError
from finetuneflow.model.family import CAUSAL, CausalFamily, Seq2SeqFamily
from finetuneflow.model.loaded import LoadedModel
from finetuneflow.model.prompts import encode_seq2seq_input, prompt_style, text_ids

PROMPTS = ("summary", "raw_chat", "raw_text")
_PLACEHOLDER = "\u2063MESSAGE\u2063"


class RawCausal(CausalFamily):
    """A causal model asked with the client's text only (chat turn or plain text)."""

    def __new__(cls, chat: bool):
        family = super().__new__(cls, str(CAUSAL))
        family.chat = chat
        return family

    def pieces(self, tokenizer) -> tuple[list[int], list[int]]:
        return _pieces(tokenizer, self.chat)

    def encode(self, tokenizer, dialogue, prompt, limit):
        prefix, suffix = self.pieces(tokenizer)
        ids = text_ids(tokenizer, dialogue)
        budget = limit - len(prefix) - len(suffix)
        if budget < 1:
            raise UserError(f"the input limit of {limit} tokens leaves no room for the text")
        return prefix + ids[:budget] + suffix, len(ids) > budget

    def input_overhead(self, tokenizer, prompt):
        prefix, suffix = self.pieces(tokenizer)
        return len(prefix) + len(suffix)


def _pieces(tokenizer, chat: bool) -> tuple[list[int], list[int]]:
    if chat and prompt_style(tokenizer) == "chat_template":
        text = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], add_generation_prompt=True,
                                             tokenize=False)
        before, after = text.split(_PLACEHOLDER)
        return (tokenizer(before, add_special_tokens=False)["input_ids"],
                tokenizer(after, add_special_tokens=False)["input_ids"])
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []), []


class RawSeq2Seq(Seq2SeqFamily):
    """A seq2seq model asked with the client's text, without the model's task prefix."""

    def encode(self, tokenizer, dialogue, prompt, limit):
        return encode_seq2seq_input(tokenizer, dialogue, "", limit)

    def dialogue_text(self, text, prompt):
        return text


@lru_cache(maxsize=16)
def _family(family: str, prompt: str):
    if family == CAUSAL:
        return RawCausal(chat=prompt == "raw_chat")
    return RawSeq2Seq(family)


def prompted(loaded: LoadedModel, prompt: str) -> LoadedModel:
    """`loaded` itself for the trained prompt, else a copy that asks the model with the raw text."""
    if prompt == "summary":
        return loaded
    if prompt not in PROMPTS:
        raise ValueError(f"unknown prompt mode {prompt!r}")
    return replace(loaded, family=_family(str(loaded.family), prompt))
