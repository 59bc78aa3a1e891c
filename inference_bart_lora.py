"""Stage 7 - summarize new dialogues of any length with the finished model.

Reads:  MODEL (clean merged folder from post_merge_cleanup.py, a merged folder, an adapter folder
        whose base is found from its run_config.json, or a Hub id)
        TEXT, INPUT_FILE (.txt = one dialogue; .jsonl / .json / .csv / .parquet: every row) or stdin
Writes: stdout (one summary; several as "[id] summary" lines; a "! ..." line under a summary the
        checks flagged), or OUTPUT_FILE (.jsonl / .csv: id, summary, chunked, windows, truncated,
        generation, checks_flagged, checks_spans, checks_notes) and OUTPUT_FILE.run_config.json

Run as:
    echo "Anna: Lunch at noon?\nTom: Sure, see you there." | python inference_bart_lora.py
    python inference_bart_lora.py --text="Anna: Lunch at noon?\nTom: Sure."   (\n starts a new turn)
    python inference_bart_lora.py --input_file=../shared/data/highlightsum_val200.jsonl \
        --output_file=outputs/summaries.jsonl
    accelerate launch --multi_gpu --num_processes 2 inference_bart_lora.py --input_file=... --output_file=...
        (sharded: each process summarizes whole batches; the main process writes every row, in order)
Dialogues longer than MAX_INPUT_LENGTH tokens: LONG_INPUT=chunk summarizes them in windows cut at
turn boundaries and then summarizes the partial summaries; chunk_join joins the window summaries
instead (the summary grows with the dialogue: meetings); truncate cuts them; error refuses them.
Settings left at None come from the model folder's run_config.json (what was evaluated).
DECODING=mbr (consensus decoding; see eval_bart_lora.py --help): each dialogue's greedy summary and
MBR_SAMPLES seeded samples, the one that agrees most with the others is printed (the same seed gives
the same summaries; long dialogues: per window).
CHECKS=True: every summary is checked against its dialogue with the shipped faithfulness checks
(names, places, numbers, times the dialogue does not contain; the weakest sentence's support with
the MiniLM encoder when installed). A flagged summary gets a line such as
    ! 'Ben': name not in the dialogue
under it, and the output file's columns checks_flagged (yes/no; empty: no check ran),
checks_spans (JSON: check, start, end, text, why; offsets into the summary) and checks_notes.
Dialogues longer than the checks were validated for (meetings, over 515 words) are not flagged
(the notes say so); a check that fails never fails the run (checks_notes: "error: ...").
"""
MODEL = "ft_outputs/bart_merged_clean"  # clean/merged model folder, adapter folder, or Hub id
BASE_MODEL = None                      # [str | None] adapter folders only: the base, when its recorded path is gone
TEXT = ""                              # one dialogue on the command line
INPUT_FILE = ""                        # .txt (one dialogue), .jsonl/.json/.csv/.parquet (every row); "": stdin
DIALOGUE_COLUMN = None                 # [str | None] column holding the dialogue (None: dialogue, dialog, text, ...)
ID_COLUMN = None                       # [str | None] column holding the id (None: id, sample_id, fname...; else row-N)
OUTPUT_FILE = ""                       # .jsonl or .csv; "" prints to stdout
LONG_INPUT = "chunk"                   # [truncate | chunk | chunk_join | error] dialogues over MAX_INPUT_LENGTH
MAX_INPUT_LENGTH = None                # [int >= 16 | None] tokens per model input; None: run_config.json/the model's
INSTRUCTION = None                     # [str | None] causal models' instruction; None: the one it was trained with
NUM_BEAMS = None                       # [int >= 1 | None] None: inherited (run_config.json, else the model's config)
MAX_NEW_TOKENS = None                  # [int >= 1 | None] tokens per summary; None: inherited
MIN_NEW_TOKENS = None                  # [int >= 0 | None] None: inherited
NO_REPEAT_NGRAM_SIZE = None            # [int >= 0 | None] None: inherited
LENGTH_PENALTY = None                  # [float | None] None: inherited (beam search only)
DECODING = None                        # [greedy | beam | mbr | None] None: inherited, else greedy (beam: NUM_BEAMS > 1)
MBR_SAMPLES = None                     # [int >= 1 | None] mbr: samples besides the greedy one; None: inherited, else 8
MBR_TEMPERATURE = None                 # [float > 0 | None] mbr: sampling temperature; None: inherited, else 0.7
MBR_TOP_P = None                       # [0 < float <= 1 | None] mbr: nucleus sampling; None: inherited, else 0.95
MBR_UTILITY = None                     # [rougeL | chrf | minilm | None] mbr: agreement; None: inherited, else rougeL
MBR_FAITHFUL = None                    # [bool | None] mbr: drop unfaithful candidates first; None: inherited, else True
MBR_SEED = None                        # [int >= 0 | None] mbr: seeds the samples; None: inherited, else 42
BATCH_SIZE = 8                         # [int >= 1] dialogues (or windows) generated together
DEVICE = None                          # [str | None] None: cuda when available, else cpu
LOAD_IN_4BIT = None                    # [bool | None] adapter folders: None = as the adapter was trained
PRECISION = "auto"                     # [auto | fp32 | bf16] weights; auto: bf16 on GPUs, fp32 on CPUs (see --help)
CHECKS = True                          # check every summary against its dialogue (the shipped faithfulness checks)
CHECKS_ENCODER = None                  # [str | None] checks' sentence encoder: None = MiniLM when installed, "" = none

import sys
from pathlib import Path

from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.contract.errors import UserError, run_cli
from finetuneflow.contract.paths import resolve
from finetuneflow.contract.record import RunRecord, write_record
from finetuneflow.contract.safety import check_location, check_output_file
from finetuneflow.contract.settings import configure
from finetuneflow.engine.sharding import current_shard, summarize_sharded
from finetuneflow.model.precision import precision_for
from finetuneflow.quality.faith_report import checks_totals, flagged_line, report_columns, report_many
from finetuneflow.quality.mbr import check_utility, choose_rows
from finetuneflow.serve.inference_io import (OUTPUT_FORMATS, inherit_defaults, load_for_inference, loads_in_4bit,
                                             model_info, read_inputs, write_outputs)

RENAMED = {"TEXT_COLUMN": "DIALOGUE_COLUMN"}
STAGE = "inference_bart_lora"


def check_output(cfg) -> Path | None:
    """OUTPUT_FILE (and its run-record sidecar) checked by the output-safety rule before any work:
    never an input, the project root or a file another stage or the user wrote."""
    if not cfg.OUTPUT_FILE:
        return None
    output = resolve(cfg.OUTPUT_FILE)
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--OUTPUT_FILE={cfg.OUTPUT_FILE}: use a .jsonl or .csv file")
    inputs = [cfg.INPUT_FILE or None, cfg.MODEL, cfg.BASE_MODEL]
    sidecar = output.with_name(f"{output.name}.run_config.json")
    output = check_output_file(output, stage=STAGE, setting="OUTPUT_FILE", marker=sidecar, inputs=inputs)
    check_location(output.with_name(sidecar.name), "OUTPUT_FILE (its .run_config.json)", inputs)
    if sidecar.is_dir():
        raise UserError(f"{sidecar} is a folder; choose another OUTPUT_FILE")
    return output


def report(result, inputs, cfg, inherited, loaded, precision) -> None:
    info = model_info(loaded)
    truncated = sum(result.truncated)
    print(f"model {info['model']} ({loaded.family}, {info['dtype']} on {loaded.device}: {precision.reason}); "
          f"{len(inputs.dialogues)} dialogues from {inputs.source}; LONG_INPUT={cfg.LONG_INPUT}, "
          f"MAX_INPUT_LENGTH={cfg.MAX_INPUT_LENGTH or 'the model limit'}"
          + (f"; inherited {', '.join(inherited)}" if inherited else ""), file=sys.stderr)
    print(f"summarized {len(inputs.dialogues)} dialogues in {result.seconds:.1f}s "
          f"({result.tokens_per_s:.1f} generated tokens/s); {result.chunked} chunked into windows, "
          f"{truncated} truncated; generation {result.settings}", file=sys.stderr)
    if truncated:
        print(f"warning: {truncated} dialogues were longer than {result.max_input_length} input tokens "
              f"and were truncated; --LONG_INPUT=chunk summarizes them whole", file=sys.stderr)


def print_summaries(rows: list[dict], checks: list[dict | None]) -> None:
    """One summary (several as "[id] summary" lines), each with its "!" line when flagged."""
    for row, found in zip(rows, checks):
        print(row["summary"] if len(rows) == 1 else f"[{row['id']}] {row['summary']}")
        line = flagged_line(found)
        if line:
            print(line)


def main(argv=None) -> dict:
    cfg = configure(globals(), argv, renamed=RENAMED)
    output = check_output(cfg)
    shard = current_shard(cfg.DEVICE)   # one process, or this one's place under `accelerate launch`
    if shard.sharded and not cfg.INPUT_FILE:
        raise UserError(f"a sharded run ({shard.world} processes) splits the rows of --input_file; run one process "
                        f"for --text or stdin")
    inputs = read_inputs(cfg.TEXT, cfg.INPUT_FILE, cfg.DIALOGUE_COLUMN, cfg.ID_COLUMN, sys.stdin)
    if inputs.skipped and shard.main:
        print(f"skipped {len(inputs.skipped)} of {inputs.rows} rows with an empty dialogue (ids: "
              f"{', '.join(inputs.skipped[:10])}{', ...' if len(inputs.skipped) > 10 else ''})", file=sys.stderr)
    check_utility(cfg.MBR_UTILITY if cfg.DECODING == "mbr" else None)
    device = cfg.DEVICE if cfg.DEVICE or not shard.device else shard.device
    load_in_4bit = loads_in_4bit(cfg.MODEL, cfg.LOAD_IN_4BIT)
    precision = precision_for(cfg.MODEL, cfg.PRECISION, device, load_in_4bit)
    loaded = load_for_inference(cfg.MODEL, cfg.BASE_MODEL, device, load_in_4bit, precision)
    inherited = inherit_defaults(cfg, loaded)
    settings = GenerationSettings.from_config(cfg)
    loaded.backend.refuse_unsupported(settings)
    if settings.decoding == "mbr":
        check_utility(settings.mbr_utility)
    result = summarize_sharded(loaded, inputs.dialogues, settings, cfg.BATCH_SIZE, cfg.MAX_INPUT_LENGTH,
                               cfg.INSTRUCTION, cfg.LONG_INPUT, inputs.ids, progress=len(inputs.dialogues) > 1,
                               shard=shard, chooser=choose_rows)
    if result is None:   # another process of a sharded run: the main process writes and reports
        return {}
    report(result, inputs, cfg, inherited, loaded, precision)
    truncated = sum(result.truncated)
    checks = report_many(result.summaries, inputs.dialogues, cfg.CHECKS_ENCODER) if cfg.CHECKS \
        else [None] * len(result.summaries)
    rows = [{"id": i, "summary": s, "chunked": w > 1, "windows": w, "truncated": t, "generation": result.settings,
             **report_columns(c)}
            for i, s, w, t, c in zip(inputs.ids, result.summaries, result.windows, result.truncated, checks)]
    if output:
        record = RunRecord(STAGE, family=loaded.family, backend=loaded.backend.name, dtype=loaded.dtype,
                           generation=settings, instruction=cfg.INSTRUCTION, max_input_length=result.max_input_length,
                           lineage=loaded.record.lineage if loaded.record else RunRecord(STAGE).lineage,
                           extra={"model": model_info(loaded), "decoding": result.settings, "chunked": result.chunked,
                                  "truncated": truncated, "rows": inputs.rows, "skipped": inputs.skipped,
                                  "timing": result.timing(), "precision": precision.as_dict(),
                                  "processes": shard.world, "exact_speedups": result.speedups,
                                  "checks": checks_totals(checks) if cfg.CHECKS else None,
                                  **({"mbr": result.mbr_totals} if result.mbr_totals else {})})
        write_record(output.parent, record, cfg, [cfg.INPUT_FILE] if cfg.INPUT_FILE else [],
                     name=f"{output.name}.run_config.json")
        write_outputs(output, rows)
        print(f"wrote {len(rows)} summaries to {output}", file=sys.stderr)
    else:
        print_summaries(rows, checks)
    return {"rows": rows, "chunked": result.chunked, "truncated": truncated, "settings": result.settings,
            "skipped": inputs.skipped}


if __name__ == "__main__":
    run_cli(main)
