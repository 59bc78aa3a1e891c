"""Benchmark what users get from the server they run: llama.cpp's own llama-server against the project's
in-process llama.cpp backend on the same GGUF files, and (with REFERENCE) each file against the merged
model's evaluated summaries, e.g. Q4_K_M with and without the importance matrix.

Reads:  GGUF (one or more .gguf files: export_gguf.py's outputs, e.g. ft_outputs/gguf/<name>-q4_k_m.gguf
        and an --imatrix=auto export of the same type in another OUTPUT_DIR), DATASET (the rows),
        REFERENCE (optional: the merged model's <tag>_predictions.csv from eval_bart_lora.py on the same rows)
Writes: OUTPUT (JSON: per file, in-process vs llama-server and vs REFERENCE, the machine)

Run as (the fine-tuned SmolLM2 of RESULTS.md, its 100 held-out DialogSum rows):
    G=ft_outputs/gguf/smollm2_clean_dialogsum; I=ft_outputs/gguf_imatrix/smollm2_clean_dialogsum
    python benchmarks/bench_server_parity.py --gguf=$G-q8_0.gguf,$G-q4_k_m.gguf,$I-q4_k_m.gguf \
        --dataset=../shared/data/dialogsum_dev500.jsonl --split=validation --val_fraction=0.2 --test_fraction=0 \
        --n_samples=0 --reference=outputs/dialogsum_smollm2/merged_predictions.csv --no_repeat_ngram_size=3 \
        --alone_all=True --output=metrics/bench_server_parity.json

Per file: the rows summarized in-process (batched, greedy, as the Modelfile decodes: no
no_repeat_ngram_size), the same rows through llama-server (ship/gate_server.py: the GGUF's chat
template, the Modelfile's stop strings and num_predict, one slot, the same threads), and the share of
identical summaries; the rows that differ decoded in-process alone (batch size 1) to tell batch-order
noise from a real difference; with ALONE_ALL every row is also decoded alone (the in-process run's
own batch noise over all rows). With REFERENCE: the in-process summaries decoded as the evaluation
was (NO_REPEAT_NGRAM_SIZE) against the merged model's: identical share and ΔROUGE-L with a paired
bootstrap 95% CI (ship/gate_verdict.py), the unsupported-mention and runaway rates.
"""
GGUF = []                              # [list[str]] GGUF files to measure
DATASET = "data/samples/dialogues.jsonl"  # rows with reference summaries (file or Hub id)
SPLIT = "test"                         # split to take them from (all: every row)
N_SAMPLES = 16                         # [int >= 0] rows (0 = all of the split)
SEED = 42                              # [int >= 0] split seed
VAL_FRACTION = 0.1                     # [0 <= float < 1] validation share of one file
TEST_FRACTION = 0.1                    # [0 <= float < 1] test share of one file
INSTRUCTION = "Summarize the following dialogue in one to three sentences."  # the prompt (as the model was tuned)
MAX_INPUT_LENGTH = 384                 # [int >= 16] prompt tokens in-process (longer dialogues are not compared)
MAX_NEW_TOKENS = 64                    # [int >= 1] summary tokens (num_predict)
NO_REPEAT_NGRAM_SIZE = 0               # [int >= 0] the evaluation's, for the REFERENCE comparison only
BATCH_SIZE = 8                         # [int >= 1] in-process batch size
REFERENCE = None                       # [str | None] the merged model's predictions CSV on the same rows
ALONE_ALL = False                      # decode every row alone too (the in-process batch noise over all rows)
OUTPUT = "metrics/bench_server_parity.json"  # the results

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.contract.settings import configure


def load_rows(cfg) -> list[dict]:
    from finetuneflow.contract.data import get_split, load_dialogues, subset
    from finetuneflow.contract.paths import CODE_ROOT, resolve
    dataset = cfg.DATASET if resolve(cfg.DATASET).exists() or not (CODE_ROOT / cfg.DATASET).exists() \
        else str(CODE_ROOT / cfg.DATASET)
    data = load_dialogues(dataset, seed=cfg.SEED, val_fraction=cfg.VAL_FRACTION, test_fraction=cfg.TEST_FRACTION)
    return [{"id": str(r["id"]), "dialogue": r["dialogue"], "summary": r["summary"]}
            for r in subset(get_split(data, cfg.SPLIT), cfg.N_SAMPLES, cfg.SEED, shuffle=False)]


def reference_rows(path: str, rows: list[dict]) -> list[str]:
    from finetuneflow.contract.paths import resolve
    from finetuneflow.quality.predictions import read_predictions
    frame = read_predictions(resolve(path)).frame
    by_id = {str(r.id): r.prediction for r in frame.itertuples()}
    missing = [r["id"] for r in rows if r["id"] not in by_id]
    if missing:
        raise UserError(f"REFERENCE={path} has no prediction for row {missing[0]} ({len(missing)} missing); pass the "
                        f"predictions of the same rows (same DATASET, SPLIT, fractions and N_SAMPLES)")
    return [by_id[r["id"]] for r in rows]


def in_process(cfg, path: Path, rows: list[dict]):
    """The in-process runs (served decoding; evaluated decoding with REFERENCE) and the server plan."""
    from finetuneflow.contract.decoding import GenerationSettings
    from finetuneflow.model.loading import load_model
    from finetuneflow.ship.gate_rows import Decoding
    from finetuneflow.ship.gate_run import run_side, summaries_alone
    from finetuneflow.ship.gate_server import ServerPlan, context_size
    from finetuneflow.ship.ollama import ollama_template
    served = Decoding(cfg.INSTRUCTION, cfg.MAX_INPUT_LENGTH, "truncate",
                      GenerationSettings(num_beams=1, max_new_tokens=cfg.MAX_NEW_TOKENS))
    loaded = load_model(str(path))
    try:
        side = run_side(loaded, rows, served, cfg.BATCH_SIZE, "batched")
        evaluated = None
        if cfg.REFERENCE:
            evaluated = side if not cfg.NO_REPEAT_NGRAM_SIZE else run_side(
                loaded, rows, Decoding(cfg.INSTRUCTION, cfg.MAX_INPUT_LENGTH, "truncate", GenerationSettings(
                    num_beams=1, max_new_tokens=cfg.MAX_NEW_TOKENS,
                    no_repeat_ngram_size=cfg.NO_REPEAT_NGRAM_SIZE)), cfg.BATCH_SIZE, "evaluated", warm_up=False)
        alone = summaries_alone(loaded, rows, served) if cfg.ALONE_ALL else None
        excluded = [i for i, cut in enumerate(side.truncated) if cut]
        plan = ServerPlan(side.summaries, excluded, context_size(loaded, rows, cfg.INSTRUCTION, cfg.MAX_NEW_TOKENS),
                          loaded.model.n_threads, "batched, greedy",
                          ("-ctk", "f32", "-ctv", "f32", "-fa", "off") if loaded.model.file_type == "f32" else ())
        stops = ollama_template(loaded.tokenizer, cfg.INSTRUCTION)[1]
        return side, evaluated, alone, plan, stops, served
    finally:
        loaded.backend.close(loaded)


def versus_reference(reference: list[str], side, rows: list[dict]) -> dict:
    from finetuneflow.ship.gate_verdict import Margins, judge, rate_criterion, scores_of, unsupported_flags
    ref_scores, scores = scores_of(reference, rows), scores_of(side.summaries, rows)
    dialogues = [r["dialogue"] for r in rows]
    margins = Margins()
    verdict = judge(ref_scores, scores, reference, side.summaries, (rate_criterion(
        "unsupported_mentions", unsupported_flags(reference, dialogues), side.unsupported(rows), margins.unsupported),))
    return {k: verdict[k] for k in ("delta_rougeL", "identical", "identical_share", "criteria", "verdict")}


def measure(cfg, path: Path, rows: list[dict], reference: list[str] | None) -> dict:
    from finetuneflow.ship.gate_run import summaries_alone
    from finetuneflow.ship.gate_server import compare, differs, server_texts
    from finetuneflow.ship.gate_verdict import means, scores_of
    from finetuneflow.model.loading import load_model
    side, evaluated, alone_all, plan, stops, served = in_process(cfg, path, rows)
    params = {"num_predict": cfg.MAX_NEW_TOKENS, "stop": stops, "temperature": 0.0}
    texts, reasons, how = server_texts(path, rows, cfg.INSTRUCTION, params, plan, None, plan.args, print)
    differing = [i for i in range(len(rows)) if i not in plan.excluded and differs(plan.texts[i], texts[i])]
    alone = {i: alone_all[i] for i in differing} if alone_all is not None else {}
    if differing and alone_all is None:
        loaded = load_model(str(path))
        try:
            alone = dict(zip(differing, summaries_alone(loaded, [rows[i] for i in differing], served)))
        finally:
            loaded.backend.close(loaded)
    out = {"file": str(path), "bytes": path.stat().st_size, "server": {
        **compare(rows, plan.texts, texts, plan.excluded, alone), "how": how,
        "rougeL": means(scores_of(texts, rows))["rougeL"], "runaway": sum(r == "length" for r in reasons)},
        "in_process": {**means(scores_of(side.summaries, rows)), **side.timing}}
    if alone_all is not None:
        noisy = [rows[i]["id"] for i in range(len(rows)) if differs(side.summaries[i], alone_all[i])]
        out["in_process"]["batch_noise"] = {"rows": len(rows), "alone_differs": len(noisy), "ids": noisy}
    if reference is not None:
        out["vs_reference"] = versus_reference(reference, evaluated, rows)
    print(f"{path.name}: llama-server identical to in-process {out['server']['identical']}/{out['server']['compared']}"
          + (f"; vs reference identical {out['vs_reference']['identical_share']:.0%}, ΔROUGE-L "
             f"{out['vs_reference']['delta_rougeL']['mean']:+.2f} [{out['vs_reference']['delta_rougeL']['low']:+.2f}, "
             f"{out['vs_reference']['delta_rougeL']['high']:+.2f}]" if reference is not None else ""), flush=True)
    return out


def main(argv=None) -> dict:
    import platform

    from finetuneflow.contract.io import atomic_write_json
    from finetuneflow.contract.paths import resolve
    from finetuneflow.ship.llama_tools import find_tool, missing
    cfg = configure(globals(), argv)
    if find_tool("llama-server") is None:
        raise UserError(missing("llama-server"))
    paths = [resolve(p) for p in cfg.GGUF]
    if not paths or not all(p.is_file() for p in paths):
        raise UserError("GGUF: pass one or more .gguf files (--gguf=a.gguf,b.gguf)")
    rows = load_rows(cfg)
    reference = reference_rows(cfg.REFERENCE, rows) if cfg.REFERENCE else None
    results = {"rows": len(rows), "machine": {"cpu": platform.processor() or platform.machine(),
                                              "python": platform.python_version()},
               "settings": {k: cfg[k] for k in ("DATASET", "SPLIT", "N_SAMPLES", "INSTRUCTION", "MAX_INPUT_LENGTH",
                                                "MAX_NEW_TOKENS", "NO_REPEAT_NGRAM_SIZE", "BATCH_SIZE", "REFERENCE")},
               "files": [measure(cfg, p, rows, reference) for p in paths]}
    atomic_write_json(resolve(cfg.OUTPUT), results)
    print(f"wrote {cfg.OUTPUT}")
    return results


if __name__ == "__main__":
    run_cli(main)
