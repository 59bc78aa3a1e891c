"""Stage 5 - merge the LoRA adapter into its base model, and prove the merge is lossless.

Reads:  ADAPTER (adapter folder from train_bart_lora.py: adapter weights, tokenizer, run_config.json)
        the base model named in the adapter's run_config.json (or BASE_MODEL)
        METRICS_DIR/summary_metrics.csv and *_eval.json (for the model card, when present)
Writes: OUTPUT_DIR/model.safetensors, config.json, generation_config.json, tokenizer files
        OUTPUT_DIR/README.md          model card: base, data, LoRA settings, metrics, use, limits
        OUTPUT_DIR/merge_report.json  parity: max |logit diff| adapter vs merged, identical greedy outputs
        OUTPUT_DIR/run_config.json    family, instruction, generation, max_input_length, merged_from

Run as:
    python merge_bart_lora.py
    python merge_bart_lora.py --adapter=ft_outputs/smollm2_lora --output_dir=ft_outputs/smollm2_merged
The base is loaded in full precision (never 4-bit); the merged folder is written only when parity
passes (thresholds: finetuneflow/ship/parity.py). An adapter that does not change its base's outputs
(untrained, or made for another model) is refused. OUTPUT_DIR is never an input, the project root or
a folder of other files; an earlier merge there is replaced only with OVERWRITE=True, and re-running
skips one made from the same adapter.
"""
ADAPTER = "ft_outputs/bart_lora_highlightsum"   # adapter folder written by train_bart_lora.py
BASE_MODEL = None                      # [str | None] None: the base recorded in the adapter's run_config.json
OUTPUT_DIR = "ft_outputs/bart_merged_highlightsum"  # where the merged model goes
OVERWRITE = False                      # True: replace an existing merged folder
DTYPE = "auto"                         # [auto | float32 | float16 | bfloat16] auto: bf16/fp16 on GPU, fp32 on CPU
DEVICE = None                          # [str | None] None: cuda when available, else cpu
PARITY_DATASET = None                  # [str | None] probes' data; None: the adapter's data (its columns) or samples
PARITY_SAMPLES = 4                     # [int >= 1] dialogues in the parity check
PARITY_NEW_TOKENS = 32                 # [int >= 1] greedy tokens generated per probe and compared
MAX_LOGIT_DIFF = None                  # [float > 0 | None] parity tolerance; None: 1e-3 fp32, 5e-2 fp16, 0.25 bf16
METRICS_DIR = "metrics"                # evaluation results quoted in the model card
TRUST_REMOTE_CODE = False              # allow custom model code from the Hub
ALLOW_UNSAFE_WEIGHTS = False           # allow pickled weights (adapter_model.bin, pytorch_model.bin): they can run code

from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.settings import configure
from finetuneflow.ship.merging import MergeSettings, merge


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    return merge(MergeSettings.from_config(cfg), provenance=cfg)


if __name__ == "__main__":
    run_cli(main)
