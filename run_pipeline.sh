#!/usr/bin/env bash
# The whole FineTuneFlow chain on a dataset of your choice, with the seed's defaults
# (facebook/bart-large-cnn, 2,000 train / 200 validation rows, lengths 768/192, LoRA r=8 on q_proj/v_proj).
# Each stage is one line you can copy into a shell or a Colab cell (prefix it with "!").
# Run as:   bash run_pipeline.sh                                   (HighlightSum from the Hub)
#           DATASET=my_dialogues.jsonl MODEL=HuggingFaceTB/SmolLM2-360M-Instruct bash run_pipeline.sh
# A GPU is strongly recommended (a Colab T4 trains the seed recipe in well under an hour);
# on a CPU, shrink TRAIN/VAL (e.g. TRAIN=200 VAL=20).
set -euo pipefail
cd "$(dirname "$0")"
DATASET=${DATASET:-knkarthick/highlightsum}     # Hub id or local .jsonl/.json/.csv/.parquet
MODEL=${MODEL:-facebook/bart-large-cnn}         # any seq2seq or decoder-only model
TRAIN=${TRAIN:-2000}                            # training rows
VAL=${VAL:-200}                                 # validation rows (evaluated each epoch and at the end)
ADAPTER=ft_outputs/bart_lora_highlightsum       # the fixed folders later stages read by default
MERGED=ft_outputs/bart_merged_highlightsum
CLEAN=ft_outputs/bart_merged_clean

# 1. Look at the data: splits, lengths, how much 768 tokens would cut.
python inspect_dataset.py --dataset="$DATASET" --model_name="$MODEL"
# 2. (Optional) Compare candidate models zero-shot and plan the fine-tune for your GPU.
#    python benchmark_models.py --dataset="$DATASET" --n_samples=$VAL
#    python recommend_finetune.py
# 3. Fine-tune with LoRA (add --load_in_4bit=True for QLoRA). Re-running resumes after an interruption.
python train_bart_lora.py --model_name="$MODEL" --dataset="$DATASET" --train_samples=$TRAIN --val_samples=$VAL \
  --output_dir=$ADAPTER
# 4. Evaluate the base model and the adapter on the same validation rows (settings inherited from training).
python eval_bart_lora.py --model="$MODEL" --tag=baseline --dataset="$DATASET" --n_samples=$VAL \
  --max_input_length=768 --num_beams=4 --max_new_tokens=192   # the trainer's evaluation settings
python eval_bart_lora.py --model=$ADAPTER --tag=lora --dataset="$DATASET" --n_samples=$VAL
# 5. Merge (with a parity check) and give the merged model the evaluated generation defaults.
python merge_bart_lora.py --adapter=$ADAPTER --output_dir=$MERGED
python post_merge_cleanup.py --model=$MERGED --output_dir=$CLEAN
# 6. Evaluate the merged model; compare all three with confidence intervals, charts and an HTML report.
python eval_bart_lora.py --model=$CLEAN --tag=merged --dataset="$DATASET" --n_samples=$VAL
python eval_metrics_bart_lora.py
# 7. Use it: one dialogue from stdin, or serve it over HTTP (Ctrl-C to stop).
echo "Anna: Lunch tomorrow at 12:30? Tom: Yes, see you at the usual place." | python inference_bart_lora.py --model=$CLEAN
#    python serve_api.py --model=$CLEAN
# 8. Export: GGUF + Ollama Modelfile for decoder-only models; BART/T5 get CTranslate2 int8 instead.
if python -c "import json,sys; sys.exit(0 if json.load(open('$CLEAN/run_config.json'))['family']=='causal' else 1)"; then
  python export_gguf.py --model=$CLEAN --outtype=q8_0
else
  python export_gguf.py --model=$CLEAN --format=ct2 --quantization=int8
fi
