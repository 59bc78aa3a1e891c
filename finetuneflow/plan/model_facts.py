"""What the benchmark records and the planner needs about a model, in one place.

`architecture_columns(config)` reads the architecture from a config through
finetuneflow.contract.architectures (family, type, hidden size, layers, vocabulary, positions);
`linear_layers(model)` measures the layers LoRA can target and a 4-bit load quantises. The
benchmark writes both into the ranking (measured on the loaded model) and the planner computes
them from the config (the model built on the `meta` device), so the two always agree.
"""
from __future__ import annotations

from typing import Any

from finetuneflow.contract import architectures as arch


def encoder_decoder_layers(config: Any) -> tuple[int, int]:
    """(encoder layers, decoder layers); a decoder-only model has no encoder layers."""
    if arch.family_name(config) == arch.SEQ2SEQ:
        encoder = int(arch.get(config, "encoder_layers", "num_layers", default=0))
        decoder = int(arch.get(config, "decoder_layers", "num_decoder_layers", default=encoder))
        return encoder, decoder
    return 0, int(arch.get(config, "num_hidden_layers", "n_layer", "num_layers", default=0))


def architecture_columns(config: Any) -> dict:
    """The ranking's architecture columns, from a transformers config or a config.json dict."""
    encoder, decoder = encoder_decoder_layers(config)
    return {"family": arch.family_name(config), "model_type": arch.model_type(config),
            "hidden_size": arch.hidden_size(config) or None, "encoder_layers": encoder,
            "decoder_layers": decoder or None, "vocab_size": int(arch.get(config, "vocab_size", default=0)) or None,
            "max_positions": arch.max_positions(config)}


def linear_layers(model) -> tuple[int, dict[str, int]]:
    """(quantizable parameters, {layer name: sum of in + out features over the layers of that name})
    over the Linear layers (and GPT-2's Conv1D) except the output head: what bitsandbytes
    quantises in a 4-bit load and what LoRA can target. Counted from the layer shapes, so a model
    already loaded in 4-bit (packed weights) counts the same as a 16-bit one."""
    import torch
    from transformers.pytorch_utils import Conv1D
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quantizable, dims = 0, {}
    for name, module in model.named_modules():
        if module is head or not name:
            continue
        if isinstance(module, torch.nn.Linear):
            n_in, n_out = module.in_features, module.out_features
        elif isinstance(module, Conv1D):
            n_in, n_out = module.weight.shape[0], module.nf
        else:
            continue
        bias = n_out if getattr(module, "bias", None) is not None else 0
        quantizable += n_in * n_out + bias
        leaf = name.rsplit(".", 1)[-1]
        dims[leaf] = dims.get(leaf, 0) + n_in + n_out
    return quantizable, dims
