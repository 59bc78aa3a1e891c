"""Training memory: what a fine-tune needs, part by part, and the cheapest method that fits.

Training memory (bytes; P = all parameters, P_q = parameters of the Linear layers except the
output head, i.e. what bitsandbytes quantises, P_e = P - P_q, P_L = LoRA parameters
= r x sum(in + out) over the targeted Linear layers; w = 2 bytes per 16-bit value on a GPU,
4 on a CPU, where training runs in fp32):

    full fine-tune  weights 4P (fp32 master) + gradients 4P + AdamW moments 8P       = 16 P
    LoRA            frozen base w*P + adapters 4 P_L + gradients 4 P_L + AdamW 8 P_L
    QLoRA           NF4 base with double quantisation 0.516 P_q (4.127 bits/param)
                    + 4 P_e (prepare_model_for_kbit_training upcasts the rest to fp32)
                    + the same 16 P_L for the adapters
    activations     34*b*h*(w/2)*(L_enc*s_enc + L_dec*s_dec) without gradient checkpointing
                    (Korthikanti et al. 2022, 34*s*b*h bytes per layer in 16-bit; attention
                    scores are not stored with SDPA/flash kernels); with checkpointing one
                    w-byte hidden state per layer and token, b*h*w*(L_enc*s_enc + L_dec*s_dec),
                    plus one layer recomputed in full during backward, 34*b*s*h*(w/2)
    logits          b * s_out * V * (w + 8): the w-byte logits, their fp32 copy for the
                    cross-entropy and its fp32 gradient (s_out = the decoder length for
                    seq2seq, the whole prompt + summary for causal models)
    overhead        0.5 GB (CUDA context, cuBLAS workspace, allocator slack)

with b the micro-batch, s_enc/s_dec the input/target lengths (causal: one sequence of
MAX_INPUT_LENGTH prompt tokens + MAX_TARGET_LENGTH summary tokens), h the hidden size, L the
layers and V the vocabulary. A method fits when the total is at most MEMORY_MARGIN of the
memory. The plan takes the first that fits, cheapest first, at the planned micro-batch: LoRA
without gradient checkpointing (16-bit base: no quantisation error, fastest steps), LoRA with
checkpointing (~30% more compute), QLoRA without, QLoRA with (a quarter of the weight memory,
slower steps); when none fits, the micro-batch is halved (gradient accumulation doubled, same
effective batch) and the search repeats. Full fine-tuning is estimated for reference only: the
trainer (train_bart_lora.py) trains adapters.

GB = 10^9 bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

from finetuneflow.plan.hardware import GB, GPUS, Target
from finetuneflow.plan.shapes import ModelShape

OVERHEAD_GB = 0.5              # CUDA context, cuBLAS workspace, allocator slack
NF4_BYTES = 4.127 / 8          # NF4 with double quantisation (QLoRA paper: 0.127 bits/param of constants)
METHODS = ("lora", "qlora")    # in order of preference; "full" is estimated for reference
METHOD_NAMES = {"full": "full fine-tune", "lora": "LoRA", "qlora": "QLoRA (4-bit base)"}


@dataclass(frozen=True)
class Workload:
    """What one training sample looks like to the memory formula."""
    input_len: int                 # MAX_INPUT_LENGTH (causal: the whole prompt)
    target_len: int                # MAX_TARGET_LENGTH
    lora_r: int
    targets: tuple[str, ...]       # LoRA target layer names, or ("all-linear",)


def sequence_lengths(shape: ModelShape, work: Workload) -> tuple[int, int, int]:
    """(encoder tokens, decoder tokens, positions with logits) per sample; a causal model's
    input length is its whole prompt (the trainer's MAX_INPUT_LENGTH)."""
    if shape.family == "seq2seq":
        return work.input_len, work.target_len, work.target_len
    return 0, work.input_len + work.target_len, work.input_len + work.target_len


def _state_bytes(shape: ModelShape, method: str, p_lora: int, w: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes."""
    p, pq = shape.parameters, shape.quantizable
    if method == "full":
        return 4 * p, 4 * p, 8 * p
    if method == "lora":
        return w * p + 4 * p_lora, 4 * p_lora, 8 * p_lora
    if method == "qlora":
        return NF4_BYTES * pq + 4 * (p - pq) + 4 * p_lora, 4 * p_lora, 8 * p_lora
    raise ValueError(method)


def estimate_memory(shape: ModelShape, method: str, micro_batch: int, work: Workload, device: str = "cuda",
                    checkpointing: bool = True) -> dict:
    """Training memory in GB by part (see the module docstring for the formula)."""
    w = 2 if device == "cuda" else 4
    p_lora = shape.lora_parameters(list(work.targets), work.lora_r)
    weights, grads, optimizer = _state_bytes(shape, method, p_lora, w)
    s_enc, s_dec, s_logits = sequence_lengths(shape, work)
    b, h = micro_batch, shape.hidden_size
    token_layers = shape.encoder_layers * s_enc + shape.decoder_layers * s_dec
    if checkpointing:
        activations = b * h * w * token_layers + 34 * b * max(s_enc, s_dec) * h * (w / 2)
    else:
        activations = 34 * b * h * (w / 2) * token_layers
    logits = b * s_logits * shape.vocab_size * (w + 8)
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer,
             "activations": activations, "logits": logits, "overhead": OVERHEAD_GB * GB}
    out = {k: round(v / GB, 2) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / GB, 2)
    out["trainable_parameters"] = int(shape.parameters if method == "full" else p_lora)
    return out


def choose_method(shape: ModelShape, target: Target, micro_batch: int, work: Workload, margin: float) -> dict:
    """The first that fits of LoRA, LoRA + checkpointing, QLoRA, QLoRA + checkpointing at the
    planned micro-batch, halving the micro-batch when none does."""
    budget = margin * target.memory_gb
    tried = []
    batch = max(1, micro_batch)
    while True:
        for method in METHODS:
            for checkpointing in (False, True):
                estimate = estimate_memory(shape, method, batch, work, target.device, checkpointing)
                tried.append({"method": method, "micro_batch": batch, "gradient_checkpointing": checkpointing,
                              "total_gb": estimate["total"]})
                if estimate["total"] <= budget:
                    return {"method": method, "micro_batch": batch, "gradient_checkpointing": checkpointing,
                            "fits": True, "budget_gb": round(budget, 2), "tried": tried}
        if batch == 1:
            return {"method": None, "micro_batch": 1, "gradient_checkpointing": True, "fits": False,
                    "budget_gb": round(budget, 2), "tried": tried}
        batch //= 2


def gpus_that_fit(shape: ModelShape, micro_batch: int, work: Workload, margin: float) -> list[str]:
    """The listed GPUs (nominal memory) on which some method fits."""
    return [key for key, spec in GPUS.items()
            if choose_method(shape, Target(key, key, spec.memory_gb, "table", "cuda"), micro_batch, work,
                             margin)["fits"]]
