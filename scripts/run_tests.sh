#!/usr/bin/env bash
# The test suite, offline. pytest's exit code 5 ("no tests ran") is a failure here.
# Then the precision tests again with the CPU bf16 probe forced the other way (FTF_CPU_BF16, see
# finetuneflow/model/precision.py), so a CI machine without native bf16 also runs the bf16 path
# (and one with it, the fp32 fallback).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
"$PY" -m pytest -q tests "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
native=$("$PY" -c "from finetuneflow.model.precision import cpu_bf16; print(int(cpu_bf16().native))") || exit 1
echo "precision tests again with FTF_CPU_BF16=$((1 - native)) (this run's CPU probe said $native)"
FTF_CPU_BF16=$((1 - native)) "$PY" -m pytest -q -p no:randomly tests/test_precision.py tests/test_train.py -k precision
second=$?
if [ "$rc" -eq 0 ]; then rc=$second; fi
exit "$rc"
