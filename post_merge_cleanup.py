"""Stage 6 - give the merged model one consistent generation config: the evaluated settings as defaults.

Reads:  MODEL (the merged folder from merge_bart_lora.py: weights, config.json, generation_config.json,
        tokenizer, run_config.json with the evaluated "generation" settings)
Writes: OUTPUT_DIR/ the same weights and tokenizer (copied, unchanged) with
        config.json             generation parameters and stale task_specific_params removed
        generation_config.json  special tokens checked against the tokenizer, evaluated settings as defaults
        cleanup_report.json     every change with its reason, and the verification result
        README.md, run_config.json

Run as:
    python post_merge_cleanup.py
    python post_merge_cleanup.py --model=ft_outputs/smollm2_merged --output_dir=ft_outputs/smollm2_clean
Afterwards a plain `model.generate(**inputs)` reproduces the evaluated summaries: the script checks
that by loading the result with plain transformers, generating with no warnings allowed, and comparing
with the shared engine, and that the cleaned folder computes the same logits as MODEL. OUTPUT_DIR is
never MODEL, the project root or a folder of other files; an earlier cleanup there is replaced
(atomically) only with OVERWRITE=True, and re-running skips one made from the same MODEL files with the
same settings.
"""
MODEL = "ft_outputs/bart_merged_highlightsum"  # merged model folder from merge_bart_lora.py
OUTPUT_DIR = "ft_outputs/bart_merged_clean"  # where the cleaned model goes
OVERWRITE = False                      # True: replace an earlier cleaned folder in OUTPUT_DIR
NUM_BEAMS = None                       # [int >= 1 | None] None: the evaluated value from MODEL/run_config.json
MAX_NEW_TOKENS = None                  # [int >= 1 | None] None: evaluated value (tokens)
MIN_NEW_TOKENS = None                  # [int >= 0 | None] None: evaluated value (tokens)
NO_REPEAT_NGRAM_SIZE = None            # [int >= 0 | None] None: evaluated value
LENGTH_PENALTY = None                  # [float | None] None: evaluated value (beam search only)
VERIFY_SAMPLES = 2                     # [int >= 1] dialogues generated with plain generate() to verify the result
DEVICE = None                          # [str | None] None: cuda when available, else cpu

from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.settings import configure
from finetuneflow.ship.cleanup import CleanupSettings, clean

RENAMED = {"MERGED_DIR": "MODEL"}


def main(argv=None) -> dict:
    cfg = configure(globals(), argv, renamed=RENAMED)
    return clean(CleanupSettings.from_config(cfg), provenance=cfg)


if __name__ == "__main__":
    run_cli(main)
