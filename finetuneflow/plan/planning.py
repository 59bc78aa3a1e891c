"""Fine-tuning plans: how big a model really is, what a GPU holds, which method fits, how long.

Model size comes from the model's config (the model is built on the `meta` device, which
allocates nothing, and its parameters are counted), never from its name. When the config
cannot be loaded (offline, gated Hub model) the architecture columns of the benchmark ranking
are used: `parameters`, `hidden_size`, `encoder_layers`, `decoder_layers`, `vocab_size`,
`model_type`, `quantizable_parameters` (the benchmark records them from the loaded model); a
ranking without `quantizable_parameters` takes the 16-bit part as 2*V*h (input embedding and an
untied output head: conservative); other missing columns are guessed (see shape_from_row) and
the plan says so. GB = 10^9 bytes.

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

Training time is an estimate: the benchmark's measured generation throughput (samples/s) is
scaled by the relative speed of the target GPU to the GPU that measured it, and by a
train-per-generate factor per method (TRAIN_PER_GENERATE below). Relative speed =
sqrt(dense fp16 TFLOPS ratio x memory bandwidth ratio) to a T4: training is compute-bound,
generation bandwidth-bound, the geometric mean weighs both. Expect it within about 2x.
"""
from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetuneflow.contract.errors import UserError

GB = 1e9
MEMORY_MARGIN = 0.8            # share of the memory a plan may use
OVERHEAD_GB = 0.5              # CUDA context, cuBLAS workspace, allocator slack
PROMPT_TOKENS = 48             # chat template + instruction around a causal model's dialogue
NF4_BYTES = 4.127 / 8          # NF4 with double quantisation (QLoRA paper: 0.127 bits/param of constants)
METHODS = ("lora", "qlora")    # in order of preference; "full" is estimated for reference
METHOD_NAMES = {"full": "full fine-tune", "lora": "LoRA", "qlora": "QLoRA (4-bit base)"}
# Training samples/s per generated sample/s on the same device, without gradient checkpointing
# (checkpointing recomputes the forward pass: x 0.75). Calibrated on the seed's Colab T4 logs:
# Llama-3.2-1B QLoRA with checkpointing trained 8 samples per 8.39 s step (0.95/s) where the
# benchmark generated 0.51 samples/s -> 1.9, i.e. 2.5 without checkpointing. LoRA skips the 4-bit
# dequantisation (~1.3x faster); a full fine-tune adds the weight-gradient matmuls (6P vs 4P FLOPs).
TRAIN_PER_GENERATE = {"qlora": 2.5, "lora": 3.3, "full": 2.2}


@dataclass(frozen=True)
class GpuSpec:
    memory_gb: float       # nominal memory
    tflops: float          # dense fp16/bf16 tensor-core TFLOPS (no sparsity)
    bandwidth_gbs: float   # memory bandwidth
    bf16: bool

    @property
    def relative_speed(self) -> float:
        """Speed relative to a T4: sqrt(TFLOPS ratio x bandwidth ratio)."""
        t4 = GPUS["T4"]
        return math.sqrt(self.tflops / t4.tflops * self.bandwidth_gbs / t4.bandwidth_gbs)


GPUS = {  # vendor datasheets
    "T4": GpuSpec(16, 65, 320, False),
    "L4": GpuSpec(24, 121, 300, True),
    "A10": GpuSpec(24, 125, 600, True),
    "A100": GpuSpec(40, 312, 1555, True),
    "A100-80GB": GpuSpec(80, 312, 2039, True),
    "H100": GpuSpec(80, 989, 3350, True),
    "H200": GpuSpec(141, 989, 4800, True),
}


def match_gpu(name: str | None) -> str | None:
    """The GPUS key for a device or user-given name ("Tesla T4", "NVIDIA A100-SXM4-80GB", "a10g")."""
    if not name:
        return None
    text = name.upper().replace("_", "-")
    for key, pattern in (("A100-80GB", r"A100.*80\s*G"), ("A100", r"A100"), ("H200", r"H200"),
                         ("H100", r"H100"), ("A10", r"\bA10G?\b"), ("L4", r"\bL4\b"), ("T4", r"\bT4\b")):
        if re.search(pattern, text):
            return key
    return None


def gpu_key(name: str) -> str:
    key = match_gpu(name)
    if key is None:
        raise UserError(f"unknown GPU_NAME {name!r}; known GPUs: {', '.join(GPUS)} (or leave GPU_NAME "
                        f"empty to detect this machine's GPU)")
    return key


@dataclass
class Target:
    """The machine a plan is made for."""
    name: str                 # what the user gave or the device reported
    key: str | None           # GPUS key, "CPU", or None for an unrecognised GPU
    memory_gb: float          # memory the plan may fill (before MEMORY_MARGIN)
    source: str               # "GPU_NAME", "detected", "GPU_MEMORY_GB"
    device: str               # "cuda" or "cpu"

    @property
    def relative_speed(self) -> float | None:
        return GPUS[self.key].relative_speed if self.key in GPUS else None


def resolve_target(gpu_name: str = "", gpu_memory_gb: float | None = None) -> Target:
    """GPU_NAME / GPU_MEMORY_GB when given, else this machine's GPU (free memory), else its CPU (available RAM)."""
    if gpu_name:
        key = gpu_key(gpu_name)
        memory = gpu_memory_gb or GPUS[key].memory_gb
        return Target(gpu_name, key, float(memory), "GPU_NAME" + (" + GPU_MEMORY_GB" if gpu_memory_gb else ""), "cuda")
    import torch
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        free, _total = torch.cuda.mem_get_info(0)
        return Target(name, match_gpu(name), float(gpu_memory_gb or free / GB),
                      "GPU_MEMORY_GB" if gpu_memory_gb else "detected: free GPU memory", "cuda")
    if gpu_memory_gb:
        return Target("unnamed GPU", None, float(gpu_memory_gb), "GPU_MEMORY_GB", "cuda")
    import psutil
    return Target("CPU", "CPU", psutil.virtual_memory().available / GB, "detected: available RAM", "cpu")


@dataclass
class ModelShape:
    """What the memory formula needs to know about a model."""
    parameters: int
    quantizable: int              # parameters in Linear layers except the output head
    hidden_size: int
    encoder_layers: int
    decoder_layers: int
    vocab_size: int
    family: str                   # "seq2seq" or "causal"
    model_type: str
    max_positions: int | None
    lora_dims: dict = field(default_factory=dict)   # target name -> sum(in + out) over its Linear layers
    source: str = "config"        # "config" or "ranking" (+ what was guessed)

    def lora_parameters(self, targets: list[str], r: int) -> int:
        return r * sum(self.lora_dims.get(t, 0) for t in targets)


def _config_int(config, *names, default=0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def shape_from_config(config) -> ModelShape:
    """Build the model on the meta device (no memory) and measure it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    head = model.get_output_embeddings()
    quantizable, dims = 0, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            quantizable += sum(p.numel() for p in module.parameters(recurse=False))
            leaf = name.rsplit(".", 1)[-1]
            dims[leaf] = dims.get(leaf, 0) + module.in_features + module.out_features
    hidden = _config_int(config, "hidden_size", "d_model", "n_embd")
    if seq2seq:
        encoder = _config_int(config, "encoder_layers", "num_layers")
        decoder = _config_int(config, "decoder_layers", "num_decoder_layers", default=encoder)
    else:
        encoder, decoder = 0, _config_int(config, "num_hidden_layers", "n_layer")
    limit = _config_int(config, "max_position_embeddings", "n_positions", default=0) or None
    return ModelShape(sum(p.numel() for p in model.parameters()), quantizable, hidden, encoder, decoder,
                      _config_int(config, "vocab_size"), "seq2seq" if seq2seq else "causal",
                      config.model_type, limit, dims, "config")


def number(row: dict, key: str) -> float | None:
    value = row.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def shape_from_row(row: dict) -> ModelShape:
    """A shape from the ranking's columns; missing architecture columns are guessed and said so:
    a decoder-only shape with P = 12*L*h^2 and h/L = 128 (Llama-like), vocabulary 50,000."""
    params = number(row, "parameters")
    if not params:
        raise UserError(f"model {row.get('model')!r}: its config cannot be loaded and the ranking has no "
                        f"parameter count; re-run benchmark_models.py for it, or add a 'parameters' column")
    guessed = []
    hidden = number(row, "hidden_size")
    if not hidden:
        hidden = 64 * max(1, round((128 * params / 12) ** (1 / 3) / 64))
        guessed.append("hidden_size")
    encoder, decoder = number(row, "encoder_layers") or 0, number(row, "decoder_layers")
    if not decoder:
        decoder = max(1, round(hidden / 128))
        guessed.append("layers")
    vocab = number(row, "vocab_size")
    if not vocab:
        vocab = 50_000
        guessed.append("vocab_size")
    family = str(row.get("family") or ("seq2seq" if encoder else "causal"))
    model_type = str(row.get("model_type") or "")
    quantizable = number(row, "quantizable_parameters")   # measured by the benchmark
    if not quantizable:   # input embedding + an untied output head stay 16-bit: conservative
        quantizable = params - min(0.5 * params, 2 * vocab * hidden)
    blocks = encoder + 2 * decoder if family == "seq2seq" else decoder
    dims = {t: int(blocks * hidden * (4 if t == "qkv_proj" else 2))
            for t in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "q", "v", "c_attn")}
    source = "ranking" + (f" (guessed: {', '.join(guessed)})" if guessed else "")
    return ModelShape(int(params), int(quantizable), int(hidden), int(encoder), int(decoder),
                      int(vocab), family, model_type, None, dims, source)


def default_targets(shape: ModelShape) -> list[str]:
    """LoRA targets per architecture: BART-style q_proj/v_proj, T5 q/v, Phi-3 qkv_proj/o_proj,
    GPT-2 c_attn, Llama-style q/k/v/o_proj; "all-linear" when none of these exist."""
    if shape.family == "seq2seq":
        choices = [["q_proj", "v_proj"], ["q", "v"]]
    else:
        choices = [["q_proj", "k_proj", "v_proj", "o_proj"], ["qkv_proj", "o_proj"], ["c_attn"]]
    if shape.source == "config":
        for choice in choices:
            if all(t in shape.lora_dims for t in choice):
                return choice
        return ["all-linear"]
    if shape.model_type.startswith(("t5", "mt5", "umt5")):
        return ["q", "v"]
    if shape.model_type == "phi3":
        return ["qkv_proj", "o_proj"]
    if shape.model_type == "gpt2":
        return ["c_attn"]
    return choices[0]


def lora_hyperparameters(shape: ModelShape) -> dict:
    """r 8 / alpha 32 under 1B parameters (the seed's BART setting), r 16 / alpha 32 from 1B
    (more capacity for a decoder-only model learning a new output format); lr 2e-4 (1e-4 from
    20B, as in the QLoRA paper); dropout 0.05."""
    big = shape.parameters >= 1e9
    return {"r": 16 if big else 8, "alpha": 32, "dropout": 0.05, "target_modules": default_targets(shape),
            "lr": 1e-4 if shape.parameters >= 2e10 else 2e-4}


def sequence_lengths(shape: ModelShape, input_len: int, target_len: int) -> tuple[int, int, int]:
    """(encoder tokens, decoder tokens, positions with logits) per sample; a causal model's
    input length is its whole prompt (the trainer's MAX_INPUT_LENGTH)."""
    if shape.family == "seq2seq":
        return input_len, target_len, target_len
    return 0, input_len + target_len, input_len + target_len


def estimate_memory(shape: ModelShape, method: str, micro_batch: int, input_len: int, target_len: int,
                    lora_r: int, targets: list[str], device: str = "cuda", checkpointing: bool = True) -> dict:
    """Training memory in GB by part (see the module docstring for the formula)."""
    w = 2 if device == "cuda" else 4
    p, pq = shape.parameters, shape.quantizable
    if targets == ["all-linear"]:
        p_lora = lora_r * sum(shape.lora_dims.values())
    else:
        p_lora = shape.lora_parameters(targets, lora_r)
    if method == "full":
        weights, grads, optimizer = 4 * p, 4 * p, 8 * p
    elif method == "lora":
        weights, grads, optimizer = w * p + 4 * p_lora, 4 * p_lora, 8 * p_lora
    elif method == "qlora":
        weights, grads, optimizer = NF4_BYTES * pq + 4 * (p - pq) + 4 * p_lora, 4 * p_lora, 8 * p_lora
    else:
        raise ValueError(method)
    s_enc, s_dec, s_logits = sequence_lengths(shape, input_len, target_len)
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
    out["trainable_parameters"] = int(p if method == "full" else p_lora)
    return out


def choose_method(shape: ModelShape, target: Target, micro_batch: int, input_len: int, target_len: int,
                  lora_r: int, targets: list[str], margin: float = MEMORY_MARGIN) -> dict:
    """The first that fits of LoRA, LoRA + checkpointing, QLoRA, QLoRA + checkpointing at the
    planned micro-batch, halving the micro-batch when none does."""
    budget = margin * target.memory_gb
    tried = []
    batch = max(1, micro_batch)
    while True:
        for method in METHODS:
            for checkpointing in (False, True):
                estimate = estimate_memory(shape, method, batch, input_len, target_len, lora_r, targets,
                                           target.device, checkpointing)
                tried.append({"method": method, "micro_batch": batch, "gradient_checkpointing": checkpointing,
                              "total_gb": estimate["total"]})
                if estimate["total"] <= budget:
                    return {"method": method, "micro_batch": batch, "gradient_checkpointing": checkpointing,
                            "fits": True, "budget_gb": round(budget, 2), "tried": tried}
        if batch == 1:
            return {"method": None, "micro_batch": 1, "gradient_checkpointing": True, "fits": False,
                    "budget_gb": round(budget, 2), "tried": tried}
        batch //= 2


def round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


def plan_lengths(overview: dict | None, shape: ModelShape, default_input: int, default_target: int,
                 input_cap: int, target_cap: int) -> dict:
    """Input/target lengths: the dataset overview's p99 token counts rounded up to 64, within the
    caps and the model's position limit; the defaults when there is no overview."""
    tokens = {}
    if overview:
        lengths = overview.get("lengths", {})
        tokens = {role: (lengths.get(role, {}).get("tokens") or {}).get("p99") for role in ("dialogue", "summary")}
    source = "dataset overview p99" if tokens.get("dialogue") and tokens.get("summary") else "defaults"
    if source == "defaults":
        input_len, target_len = default_input, default_target
    else:   # a causal model's input is the whole prompt: the dialogue plus the template around it
        wanted = tokens["dialogue"] + (PROMPT_TOKENS if shape.family == "causal" else 0)
        input_len = min(input_cap, max(128, round_up(wanted, 64)))
        target_len = min(target_cap, max(32, round_up(tokens["summary"] + 1, 64)))
    notes = []
    if source != "defaults" and tokens["dialogue"] > input_len:
        notes.append(f"p99 dialogue is {tokens['dialogue']:.0f} tokens; capped at {input_len} (longer dialogues are cut)")
    if shape.max_positions:
        room = shape.max_positions - (0 if shape.family == "seq2seq" else target_len)
        if input_len > room:
            input_len = room
            notes.append(f"input cut to {room} tokens to fit the model's {shape.max_positions} positions")
    return {"max_input_length": int(input_len), "max_target_length": int(target_len), "source": source,
            "tokenizer": (overview or {}).get("tokenizer"), "notes": notes}


def device_speed(device_name: str | None) -> tuple[str | None, float | None]:
    """(key, relative speed) of the device a benchmark ran on; CPU has no GPU-relative speed."""
    if not device_name:
        return None, None
    if str(device_name).lower().startswith("cpu"):
        return "CPU", None
    key = match_gpu(device_name)
    return key, (GPUS[key].relative_speed if key else None)


def estimate_time(samples_per_s: float | None, bench_device: str | None, target: Target, method: str,
                  train_samples: int, val_samples: int, epochs: int, checkpointing: bool = False) -> dict:
    """Minutes per epoch (training + one validation pass) and in total (plus the zero-shot
    evaluation before training), scaled from the measured generation speed; gradient
    checkpointing recomputes the forward pass (x 0.75)."""
    if not samples_per_s:
        return {"available": False, "why": "the ranking has no measured samples/s for this model"}
    bench_key, bench_speed = device_speed(bench_device)
    if not bench_device or bench_device == target.name or (bench_key is not None and bench_key == target.key):
        scale = 1.0   # measured on this kind of device (a ranking without a device column is assumed so)
    elif bench_speed and target.relative_speed:
        scale = target.relative_speed / bench_speed
    else:
        return {"available": False, "why": f"cannot scale a measurement on {bench_device} to {target.name}: re-run "
                                            f"benchmark_models.py on the target machine, or plan for one of "
                                            f"{', '.join(GPUS)} from a benchmark run on one of them"}
    generate = samples_per_s * scale
    train = generate * TRAIN_PER_GENERATE[method] * (0.75 if checkpointing else 1.0)
    train_min = train_samples / train / 60
    eval_min = val_samples / generate / 60
    return {"available": True, "label": "estimate (expect within ~2x)", "measured_samples_per_s": samples_per_s,
            "measured_on": bench_device or f"{target.name} (assumed: the ranking names no device)",
            "speed_scale": round(scale, 3),
            "train_samples_per_s": round(train, 3), "train_minutes_per_epoch": round(train_min, 1),
            "eval_minutes_per_epoch": round(eval_min, 1),
            "minutes_per_epoch": round(train_min + eval_min, 1),
            "total_minutes": round((train_min + eval_min) * epochs + eval_min, 1)}


def as_dict(obj) -> dict:
    return asdict(obj)


# ----------------------------------------------------------------------------- rendering
def shape_for(row: dict) -> tuple[ModelShape, str]:
    """The model's shape from its config (local folder, Hub or cache), else from the ranking row,
    and a note saying which."""
    from finetuneflow.model.loading import load_config
    source = row.get("source") or row.get("entry") or row["model"]
    try:
        return shape_from_config(load_config(source)), f"model config ({source})"
    except Exception as exc:   # offline or gated: the ranking's measured columns stand in
        why = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        shape = shape_from_row(row)
        return shape, f"{shape.source} columns, because the config cannot be loaded ({why})"


def launch_script(flags: dict, plan: dict, script: Path, trainer: Path) -> str:
    """A bash script that runs the trainer under `accelerate launch` with the plan's --NAME=value
    settings, from the trainer's folder (a path relative to the script); extra arguments pass through."""
    cd = os.path.relpath(trainer.parent, script.parent)
    lines = [f"  --{k}={shlex.quote(str(v))} \\" for k, v in flags.items()]
    memory = plan["memory"][plan["method"]]
    timing = plan["time"]
    return "\n".join([
        "#!/usr/bin/env bash",
        f"# Fine-tune {plan['model']} with {METHOD_NAMES[plan['method']]} on {plan['target']} "
        f"({plan['memory_gb']:g} GB) - written by recommend_finetune.py.",
        f"# Estimated peak memory {memory['total']} GB of a {plan['budget_gb']} GB budget; "
        + (f"time ~{timing['minutes_per_epoch']} min per epoch (estimate)." if timing["available"] else
           f"no time estimate ({timing['why']})."),
        "# Extra --NAME=value arguments go to the trainer (e.g. --MAX_STEPS=20 for a smoke test).",
        "set -euo pipefail",
        f"cd \"$(dirname \"$0\")/{cd}\"",
        "exec accelerate launch --num_processes=1 --num_machines=1 --mixed_precision=no --dynamo_backend=no \\",
        f"  {trainer.name} \\", *lines, '  "$@"', ""])


def plan_markdown(plans: list[dict], target: Target, meta: dict) -> str:
    """finetune_plan.md: the target and the rules, then per model its size, memory table, choice and command."""
    lines = ["# Fine-tuning plan", "",
             f"Target: **{target.name}**, {target.memory_gb:.1f} GB ({target.source}); a plan may fill "
             f"{meta['margin']:.0%} of it. Ranking: `{meta['ranking']}`. Training data: `{meta['dataset']}`.", "",
             "Memory = weights + gradients + optimizer + activations + logits + overhead (formula in "
             "`finetuneflow/planning.py`). The method is the cheapest that fits: LoRA, then LoRA with gradient "
             "checkpointing, then QLoRA (4-bit base), at the planned micro-batch, which is halved when nothing fits. "
             "Times are **estimates** scaled from the benchmark's measured generation speed (expect within ~2x).", ""]
    for i, p in enumerate(plans, 1):
        lines += [f"## {i}. {p['model']}", "",
                  f"- Size: {p['parameters']:,} parameters ({p['parameters'] / 1e6:,.1f}M), {p['family']} ({p['model_type']}); "
                  f"from the {p['size_from']}.",
                  f"- Benchmark: ROUGE-L {p['benchmark']['rougeL']}, {p['benchmark']['samples_per_s']} samples/s on "
                  f"{p['benchmark']['device'] or 'an unnamed device'}, composite {p['benchmark']['composite']}.",
                  f"- Lengths: input {p['lengths']['max_input_length']}, summary {p['lengths']['max_target_length']} "
                  f"tokens ({p['lengths']['source']}{'; ' + '; '.join(p['lengths']['notes']) if p['lengths']['notes'] else ''}).", "",
                  f"| method | weights | grads | optimizer | activations | logits | total GB (micro-batch {p['micro_batch']}) | fits in {p['budget_gb']} GB |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for method, m in p["memory"].items():
            lines.append(f"| {METHOD_NAMES[method]} | {m['weights']} | {m['gradients']} | {m['optimizer']} | "
                         f"{m['activations']} | {m['logits']} | {m['total']} | {'yes' if m['total'] <= p['budget_gb'] else 'no'} |")
        lines.append("")
        if not p["fits"]:
            lines += [f"**Does not fit**: {p['needs']}.", ""]
            continue
        tried = ", ".join(f"{METHOD_NAMES[t['method']]}{' + checkpointing' if t['gradient_checkpointing'] else ''}"
                          f" @ {t['micro_batch']}: {t['total_gb']} GB" for t in p["search"])
        timing = p["time"]
        lines += [f"**Recommendation: {METHOD_NAMES[p['method']]}**"
                  f"{' with gradient checkpointing' if p['gradient_checkpointing'] else ''}, micro-batch "
                  f"{p['micro_batch']} x gradient accumulation {p['grad_accum']}. Tried in order: {tried}. "
                  f"(Full fine-tuning is shown for reference; the trainer trains adapters.)", "",
                  f"- Hyperparameters: {p['epochs']} epochs on {p['train_samples']} rows, lr {p['learning_rate']:g}, "
                  f"LoRA r={p['lora']['r']}, alpha={p['lora']['alpha']}, dropout {p['lora']['dropout']}, "
                  f"targets {', '.join(p['lora']['target_modules'])}.",
                  (f"- Time (estimate): ~{timing['minutes_per_epoch']} min per epoch ({timing['train_minutes_per_epoch']} "
                   f"training + {timing['eval_minutes_per_epoch']} validation), ~{timing['total_minutes']} min in total with the "
                   f"zero-shot evaluation before training; "
                   f"measured on {timing['measured_on']}, speed x{timing['speed_scale']}."
                   if timing["available"] else f"- Time: no estimate ({timing['why']})."),
                  f"- Run: `bash {Path(p['script']).name}` (in `{meta['output_dir']}`); the adapter goes to `{p['adapter_dir']}`."]
        if p["dropped_flags"]:
            lines.append(f"- Not passed (the trainer has no such setting): {', '.join(p['dropped_flags'])}.")
        lines += ["", "```bash", Path(p["script"]).read_text(encoding="utf-8").strip(), "```", ""]
    return "\n".join(lines) + "\n"
