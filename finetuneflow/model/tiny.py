"""Tiny, randomly initialised models with real tokenizers, built offline in seconds.

Tests, benchmarks and the offline demo use them to run every stage without the Hub: a tiny
BART (configured like bart-large-cnn: forced BOS, beam search, no-repeat n-grams) and a tiny
Llama with a ChatML chat template and no pad token (like SmolLM2). The tokenizers are byte-level
BPE trained with the `tokenizers` library on the bundled sample dialogues.

Run as: python -m finetuneflow.model.tiny OUT_DIR   (writes OUT_DIR/tiny-bart and OUT_DIR/tiny-llama)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (BartConfig, BartForConditionalGeneration, GenerationConfig, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

from finetuneflow.contract.paths import ROOT

SAMPLES = ROOT / "data" / "samples" / "dialogues.jsonl"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _corpus() -> list[str]:
    rows = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["dialogue"] for r in rows] + [r["summary"] for r in rows]


def _bpe(special: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def build_tiny_bart(out_dir: str | Path, vocab_size: int = 600, max_positions: int = 512) -> Path:
    torch.manual_seed(0)
    out = Path(out_dir)
    raw = _bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], vocab_size)
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                        model_max_length=max_positions)
    config = BartConfig(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=max_positions, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
                        forced_eos_token_id=2)
    model = BartForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2, forced_bos_token_id=0,
        forced_eos_token_id=2, num_beams=2, max_length=40, min_length=5, no_repeat_ngram_size=3,
        length_penalty=2.0, early_stopping=True)
    model.save_pretrained(out / "tiny-bart")
    tokenizer.save_pretrained(out / "tiny-bart")
    return out / "tiny-bart"


def build_tiny_llama(out_dir: str | Path, vocab_size: int = 600, max_positions: int = 512) -> Path:
    torch.manual_seed(0)
    out = Path(out_dir)
    raw = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], vocab_size)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", model_max_length=max_positions)
    tokenizer.chat_template = CHATML_TEMPLATE
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, bos_token_id=None, eos_token_id=eos,
                         pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, max_new_tokens=32)
    model.save_pretrained(out / "tiny-llama")
    tokenizer.save_pretrained(out / "tiny-llama")
    return out / "tiny-llama"


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "ft_outputs" / "tiny")
    print(build_tiny_bart(target))
    print(build_tiny_llama(target))
