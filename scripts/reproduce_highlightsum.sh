#!/usr/bin/env bash
# The seed's own rows (RESULTS.md, "HighlightSum"): the 200 HighlightSum validation rows its prediction
# CSVs were made on (158 chats, 42 AMI meetings of 600-8,370 words), summarized by zero-shot
# SmolLM2-135M-Instruct (truncated) and by the DialogSum LoRA adapter of scripts/reproduce_dialogsum.sh (trained on
# DialogSum rows only: nothing of these 200 was trained on), long inputs truncated or chunk_join (windows
# of the meeting summarized, the window summaries joined in order; add `chunk` to the loop for the
# map-reduce variant, not run: estimated ~30 more CPU minutes), then scored beside the seed's two bart-large-cnn systems
# from their own CSVs, per bucket (<= 600 / > 600 words), with paired bootstrap CIs and faithfulness.
# Needs ../shared/data. Time on a 2-core CPU, from the records (RESULTS.md): 3,097 s of generation
# (chunk_join 2,327 s, truncate 479 s, zero-shot 291 s); runs the DialogSum script first when its adapter
# is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled} TOKENIZERS_PARALLELISM=false
PY=${PY:-python}
SHARED=${SHARED:-../shared/data}
DATA=$SHARED/highlightsum_val200.jsonl
SEED_CSV=$SHARED/seed_outputs
BASE=ft_outputs/base_smollm2
RUN=ft_outputs/smollm2_lora_dialogsum
OUT=results/highlightsum_smollm2
WORK=outputs/highlightsum_smollm2      # the per-row CSVs (they hold the dialogues: kept out of git)
ALL="--dataset=$DATA --split=all --n_samples=0 --val_fraction=0 --test_fraction=0"
# Windows of 1,024 prompt tokens (truncate: the first 1,024), at most 64 new tokens per summary, greedy,
# no repeated 3-gram within a summary: the adapter's own decoding.
GEN="--max_input_length=1024 --max_new_tokens=64 --num_beams=1 --no_repeat_ngram_size=3"

test -d $RUN || bash scripts/reproduce_dialogsum.sh
test -d $BASE || $PY import_gguf.py --output_dir=$BASE
$PY eval_bart_lora.py --model=$BASE --tag=zeroshot_truncate $ALL $GEN --long_input=truncate --output_dir=$WORK
for mode in truncate chunk_join; do
  $PY eval_bart_lora.py --model=$RUN --tag=lora_$mode $ALL $GEN --long_input=$mode --output_dir=$WORK
done
$PY eval_metrics_bart_lora.py --output_dir=$OUT --buckets=input_words:600 --bertscore_model= \
  --predictions=$SEED_CSV/baseline_predictions.csv,$SEED_CSV/validation_predictions.csv,$WORK/zeroshot_truncate_predictions.csv,$WORK/lora_truncate_predictions.csv,$WORK/lora_chunk_join_predictions.csv \
  --names=seed_bart_zero_shot,seed_bart_lora,smollm2_zero_shot_truncate,smollm2_lora_truncate,smollm2_lora_chunk_join
cp $WORK/*_eval.json $OUT/
