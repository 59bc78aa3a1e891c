"""Stage 1 - inspect a dialogue-summarization dataset and export the subset to train on.

Reads:  DATASET (a Hub id, or a local .jsonl/.json/.csv/.parquet file or folder)
Writes: metrics/dataset_overview.json   splits, columns, length statistics, truncation share
        metrics/dataset_lengths.png     histogram of dialogue and summary lengths
        metrics/inspect_dataset.run_config.json
        EXPORT_JSONL (optional)         the selected subset as {"id", "dialogue", "summary"} lines

Run as:
    python inspect_dataset.py --dataset=knkarthick/highlightsum
    python inspect_dataset.py --dataset=../shared/data/dialogsum_dev500.jsonl --model_name=ft_outputs/base_smollm2
A single local file is split into train/validation/test (VAL_FRACTION, TEST_FRACTION, SEED).
"""
DATASET = "knkarthick/highlightsum"    # Hub id or local file/folder
HUB_CONFIG = None                      # [str | None] Hub dataset configuration name, if it has several
DIALOGUE_COLUMN = None                 # [str | None] None: auto-detect (dialogue, dialog, text, source, ...)
SUMMARY_COLUMN = None                  # [str | None] None: auto-detect (summary, highlights, target, ...)
ID_COLUMN = None                       # [str | None] None: auto-detect (id, sample_id, fname); row numbers when absent
VAL_FRACTION = 0.1                     # [0 <= float < 1] share of a single local file kept for validation
TEST_FRACTION = 0.1                    # [0 <= float < 1] share of a single local file kept for test
SEED = 42                              # [int >= 0] shuffling seed for splits and subsets
NORMALIZE = False                      # rewrite DialogSum '#Person1#' tags and \r\n (see finetuneflow/contract/data.py)
MODEL = "facebook/bart-large-cnn"      # tokenizer for token statistics ("" skips them)
MAX_INPUT_LENGTH = 768                 # [int >= 16] tokens; reports how many dialogues would be truncated
MAX_TARGET_LENGTH = 192                # [int >= 2] tokens; reports how many summaries would be truncated
SPLIT = "train"                        # split to subset and export
N_SAMPLES = 2000                       # [int >= 0] rows in the exported subset (0 = all)
EXPORT_JSONL = ""                      # path for the subset as JSONL ("" = no export)
OUTPUT_DIR = "metrics"                 # where the overview and the histogram go

import json

import numpy as np

from finetuneflow.contract.data import DataSpec, get_split, load_data, subset
from finetuneflow.contract.errors import run_cli
from finetuneflow.contract.io import atomic_path, atomic_write_json, atomic_write_text
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord, portable, write_record
from finetuneflow.contract.safety import check_output_file
from finetuneflow.contract.settings import configure

STAGE = "inspect_dataset"


def length_stats(values: list[int]) -> dict:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"mean": round(float(arr.mean()), 1), "p50": float(np.percentile(arr, 50)),
            "p90": float(np.percentile(arr, 90)), "p99": float(np.percentile(arr, 99)), "max": int(arr.max())}


def try_tokenizer(name: str):
    if not name:
        return None, "no MODEL given"
    try:
        from transformers import AutoTokenizer
        from finetuneflow.model.loading import local_or_hub
        return AutoTokenizer.from_pretrained(local_or_hub(name)), None
    except Exception as exc:  # offline, gated, or not a model: token statistics are optional
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"


def histogram(words_dialogue: list[int], words_summary: list[int], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, values, title in ((axes[0], words_dialogue, "dialogue words"), (axes[1], words_summary, "summary words")):
        ax.hist(values, bins=40, color="#4C72B0")
        ax.set_title(title)
        ax.set_xlabel("words")
        ax.set_ylabel("rows")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def check_outputs(cfg):
    """(output folder, export file or None), both checked against the output-safety rule."""
    out = resolve(cfg.OUTPUT_DIR)
    marker = out / f"{STAGE}.run_config.json"
    for name in ("dataset_overview.json", "dataset_lengths.png", marker.name):
        check_output_file(out / name, stage=STAGE, setting="OUTPUT_DIR", marker=marker, inputs=[cfg.DATASET])
    export = None
    if cfg.EXPORT_JSONL:
        export = resolve(cfg.EXPORT_JSONL)
        export = check_output_file(export, stage=STAGE, setting="EXPORT_JSONL", inputs=[cfg.DATASET],
                                   marker=export.with_name(f"{export.name}.run_config.json"))
    return out, export


def length_statistics(cfg, dialogues: list[str], summaries: list[str], tokenizer) -> tuple[dict, dict | None]:
    """Length statistics (characters, words, and tokens with a tokenizer) and what would be cut."""
    stats = {"dialogue": {"chars": length_stats([len(d) for d in dialogues]),
                          "words": length_stats([len(d.split()) for d in dialogues])},
             "summary": {"chars": length_stats([len(s) for s in summaries]),
                         "words": length_stats([len(s.split()) for s in summaries])}}
    if tokenizer is None:
        return stats, None
    dialogue_tokens = [len(ids) for ids in tokenizer(dialogues, verbose=False)["input_ids"]]
    summary_tokens = [len(ids) for ids in tokenizer(summaries, verbose=False)["input_ids"]]
    stats["dialogue"]["tokens"] = length_stats(dialogue_tokens)
    stats["summary"]["tokens"] = length_stats(summary_tokens)
    over = sum(t > cfg.MAX_INPUT_LENGTH for t in dialogue_tokens)
    truncation = {"max_input_length": cfg.MAX_INPUT_LENGTH, "max_target_length": cfg.MAX_TARGET_LENGTH,
                  "dialogues_over_limit": over, "dialogues_over_limit_share": round(over / len(dialogues), 4),
                  "summaries_over_limit": sum(t > cfg.MAX_TARGET_LENGTH for t in summary_tokens),
                  "dialogue_tokens_cut_share": round(sum(max(0, t - cfg.MAX_INPUT_LENGTH) for t in dialogue_tokens)
                                                     / max(1, sum(dialogue_tokens)), 4)}
    return stats, truncation


def print_overview(cfg, overview: dict, data, tokenizer_note: str | None, exported) -> None:
    print(f"dataset {data.source}: " + ", ".join(f"{k} {v}" for k, v in overview["rows"].items())
          + f" rows ({sum(data.dropped.values())} empty rows dropped)")
    for role in ("dialogue", "summary"):
        words = overview["lengths"][role]["words"]
        tokens = overview["lengths"][role].get("tokens")
        print(f"  {role}: words p50 {words['p50']:.0f} p90 {words['p90']:.0f} max {words['max']}"
              + (f"; tokens p50 {tokens['p50']:.0f} p90 {tokens['p90']:.0f} p99 {tokens['p99']:.0f} "
                 f"max {tokens['max']}" if tokens else ""))
    truncation = overview["truncation"]
    if truncation:
        share = truncation["dialogues_over_limit_share"]
        print(f"  {truncation['dialogues_over_limit']} dialogues ({share:.1%}) exceed "
              f"MAX_INPUT_LENGTH={cfg.MAX_INPUT_LENGTH} tokens")
    else:
        print(f"  token statistics skipped ({tokenizer_note})")
    first = overview["first_example"]
    print(f"  first example [{first['id']}]: {first['dialogue'][:160]!r}")
    if exported:
        print(f"exported {overview['export']['rows']} {cfg.SPLIT} rows to {exported}")


def main(argv=None) -> dict:
    cfg = configure(globals(), argv, renamed={"MODEL_NAME": "MODEL"})
    out, export = check_outputs(cfg)
    data = load_data(DataSpec.from_config(cfg))
    selected = get_split(data, cfg.SPLIT)
    tokenizer, tokenizer_note = try_tokenizer(cfg.MODEL)
    all_rows = [row for ds in data.splits.values() for row in ds]
    dialogues, summaries = [r["dialogue"] for r in all_rows], [r["summary"] for r in all_rows]
    stats, truncation = length_statistics(cfg, dialogues, summaries, tokenizer)
    first = selected[0] if len(selected) else all_rows[0]
    overview = {
        "dataset": data.source, "columns": data.columns, "splits_made_from_single_file": data.made_splits,
        # how this dataset was read, in the trainer's setting names: recommend_finetune.py's scripts pass them on
        "data_settings": {"HUB_CONFIG": cfg.HUB_CONFIG, "DIALOGUE_COLUMN": data.columns["dialogue"],
                          "SUMMARY_COLUMN": data.columns["summary"], "ID_COLUMN": data.columns["id"],
                          "VAL_FRACTION": cfg.VAL_FRACTION, "TEST_FRACTION": cfg.TEST_FRACTION, "SEED": cfg.SEED,
                          "NORMALIZE": cfg.NORMALIZE},
        "split_fractions": ({"validation": cfg.VAL_FRACTION, "test": cfg.TEST_FRACTION, "seed": cfg.SEED}
                            if data.made_splits else None),
        "rows": {name: len(ds) for name, ds in data.splits.items()}, "total_rows": len(all_rows),
        "dropped_empty_rows": data.dropped, "lengths": stats, "truncation": truncation,
        "tokenizer": cfg.MODEL if tokenizer is not None else None, "tokenizer_note": tokenizer_note,
        "first_example": {"id": first["id"], "dialogue": first["dialogue"][:500], "summary": first["summary"][:300]},
    }
    exported = None
    if export is not None:
        rows = subset(selected, cfg.N_SAMPLES, cfg.SEED)
        write_record(export.parent, RunRecord(STAGE, extra={"rows": len(rows), "data_split": cfg.SPLIT}), cfg,
                     data.local_files, name=f"{export.name}.run_config.json")
        exported = atomic_write_text(export, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        overview["export"] = {"path": portable(exported), "split": cfg.SPLIT, "rows": len(rows), "seed": cfg.SEED}
    histogram([len(d.split()) for d in dialogues], [len(s.split()) for s in summaries], out / "dataset_lengths.png")
    atomic_write_json(out / "dataset_overview.json", overview)
    write_record(out, RunRecord(STAGE), cfg, data.local_files, name=f"{STAGE}.run_config.json")
    print_overview(cfg, overview, data, tokenizer_note, exported)
    print(f"wrote {out / 'dataset_overview.json'} and {out / 'dataset_lengths.png'}")
    return overview


if __name__ == "__main__":
    run_cli(main)
