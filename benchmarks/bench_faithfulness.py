"""Validation of the faithfulness checks: do they catch corrupted summaries, and leave references alone?

From human reference summaries (DialogSum dev, 500 rows) the script builds one corrupted
version per corruption type, wherever the type applies (finetuneflow/quality/corruptions.py, the
same code that makes the rejected summaries of preference training, OBJECTIVE=dpo|orpo):

* speaker_swap:   the two speakers are swapped everywhere in the summary (#Person1# <-> #Person2#,
                  or the two names of a 'Name: text' chat); only summaries where some clause has one
                  speaker as its subject (otherwise a swap changes nothing);
* number_change:  one number, time or amount the dialogue supports is changed to another value
                  ("6 p.m." -> "8 p.m.", "three" -> "five", "$200" -> "$205");
* name_insert:    a person's name from another dialogue (one this dialogue does not contain) replaces
                  a speaker mention, or is added as "with <Name>" to a sentence;
* sentence_append: the first sentence of the summary of another dialogue (another topic) is appended.

Each check is run on the untouched reference and on every corrupted version. Reported per check:
the share of references it flags (false alarms) and, per corruption type, the share of corrupted
summaries it flags (detection). Thresholds were chosen on the first half of the rows (DEV_ROWS);
the second half is reported separately as held-out. A check is SHIPPED when, on the held-out half,
it flags >= 80% of its own corruption type with <= 10% false alarms; otherwise it is experimental.

Second set (harder, different style): HighlightSum validation rows 0-199 (42 long AMI meetings,
SAMSum and DialogSum chats): false alarms on its references, the same corruptions, and a
coverage check on the long meetings: the seed's zero-shot bart-large-cnn predictions (its input
was cut at 1,024 tokens) against the references, with INPUT_LIMIT_WORDS as the limit.

Reads:  DIALOGSUM, HIGHLIGHTSUM, SEED_PREDICTIONS (../shared/data), the MiniLM encoder (ENCODER)
Writes: OUTPUT_JSON (every number printed, per-row flags), printed tables in Markdown
Run as:
    python benchmarks/bench_faithfulness.py                      # ~2-3 min of CPU on 2 cores
    python benchmarks/bench_faithfulness.py --highlightsum=       # DialogSum only
"""
DIALOGSUM = "../shared/data/dialogsum_dev500.jsonl"       # rows: id, dialogue, summary, topic
HIGHLIGHTSUM = "../shared/data/highlightsum_val200.jsonl"  # second set ("" = skip)
SEED_PREDICTIONS = "../shared/data/seed_outputs/baseline_predictions.csv"  # truncated BART on HIGHLIGHTSUM ("" = skip)
N_ROWS = 0                  # DialogSum rows to use (0 = all)
DEV_ROWS = 250              # the first DEV_ROWS rows chose the thresholds; the rest is held out
ENCODER = "minilm"          # sentence encoder: "minilm", a local folder, or "" (support checks skipped)
INPUT_LIMIT_WORDS = 750     # bart-large-cnn's 1,024 tokens, in words, for the coverage check
THREADS = 1                 # torch CPU threads (1: no spin-waiting on a busy, shared CPU)
SEED = 13                   # corruption choices
OUTPUT_JSON = ""            # also write every number and per-row flag here ("" = print only)

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetuneflow.contract.errors import UserError, run_cli  # noqa: E402
from finetuneflow.contract.settings import configure  # noqa: E402
from finetuneflow.quality.corruptions import CORRUPTIONS, corrupt  # noqa: E402  (the corruptions training uses too)

OWN_CORRUPTION = {"misattribution": "speaker_swap", "unsupported_mentions": ("number_change", "name_insert"),
                  "unsupported_sentence": "sentence_append"}


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path} not found (the shared data folder); pass --dialogsum=<file.jsonl>")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- evaluation -----------------------------------------------------------------------------------
def flag_table(ref_flags: list[dict], corrupted_flags: dict[str, list[dict | None]], rows_idx: list[int]) -> dict:
    """{check: {"false_alarms": (flagged, n), corruption: (flagged, n)}} over rows_idx."""
    from finetuneflow.quality.faithfulness import CHECKS
    table = {}
    for check in CHECKS:
        entry = {}
        values = [ref_flags[i][check] for i in rows_idx if ref_flags[i][check] is not None]
        entry["false_alarms"] = (sum(values), len(values))
        for name, flags in corrupted_flags.items():
            values = [flags[i][check] for i in rows_idx if flags[i] is not None and flags[i][check] is not None]
            entry[name] = (sum(values), len(values))
        table[check] = entry
    return table


def verdicts(table: dict) -> dict:
    from finetuneflow.quality.faithfulness import VALIDATION_GOAL
    out = {}
    for check, entry in table.items():
        own = OWN_CORRUPTION[check]
        own = own if isinstance(own, tuple) else (own,)
        fa_k, fa_n = entry["false_alarms"]
        fa = fa_k / fa_n if fa_n else None
        det = {c: (entry[c][0] / entry[c][1] if entry[c][1] else None) for c in own}
        passed = (fa is not None and fa <= VALIDATION_GOAL["max_false_alarms"]
                  and all(v is not None and v >= VALIDATION_GOAL["min_detection"] for v in det.values()))
        out[check] = {"false_alarm_rate": fa, "detection": det, "shipped": passed}
    return out


def markdown(table: dict, title: str) -> str:
    cols = ["false_alarms", *CORRUPTIONS]
    lines = [f"**{title}**", "", "| check | false alarms on references | " + " | ".join(CORRUPTIONS) + " |",
             "|---|---:|" + "---:|" * len(CORRUPTIONS)]
    for check, entry in table.items():
        own = OWN_CORRUPTION[check]
        own = own if isinstance(own, tuple) else (own,)
        cells = []
        for c in cols:
            k, n = entry[c]
            cell = f"{k / n:.1%} ({k}/{n})" if n else "n/a"
            cells.append(f"**{cell}**" if c in own else cell)
        lines.append(f"| {check} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_set(rows: list[dict], corrupted: list[dict], encoder, limit: int | None) -> tuple[list, dict, list]:
    from finetuneflow.quality.faithfulness import flags, score_samples
    started = time.perf_counter()
    refs = score_samples([r["summary"] for r in rows], [r["dialogue"] for r in rows], encoder=encoder,
                         input_limit_words=limit)
    print(f"  references scored in {time.perf_counter() - started:.0f} s", flush=True)
    ref_flags = [flags(r) for r in refs.rows]
    corrupted_flags, corrupted_rows = {}, {}
    for name in CORRUPTIONS:
        idx = [i for i, c in enumerate(corrupted) if c[name]]
        scored = score_samples([corrupted[i][name] for i in idx], [rows[i]["dialogue"] for i in idx], encoder=encoder,
                               input_limit_words=limit).rows
        by_row = dict(zip(idx, scored))
        print(f"  {name} scored ({len(idx)} rows) at {time.perf_counter() - started:.0f} s", flush=True)
        corrupted_rows[name] = by_row
        corrupted_flags[name] = [flags(by_row[i]) if i in by_row else None for i in range(len(rows))]
    return refs, ref_flags, corrupted_flags, corrupted_rows


def coverage_check(rows: list[dict], predictions_csv: Path, encoder, limit: int) -> dict | None:
    """Truncated-input predictions vs references on the dialogues longer than the limit."""
    import numpy as np
    import pandas as pd
    from finetuneflow.quality.faithfulness import paired_values, score_samples
    from finetuneflow.quality.metrics import paired_bootstrap
    if not predictions_csv.is_file():
        return None
    preds = pd.read_csv(predictions_csv)
    by_dialogue = {d: p for d, p in zip(preds["dialogue"], preds["model_summary"].fillna(""))}
    long_rows = [r for r in rows if len(r["dialogue"].split()) > limit and r["dialogue"] in by_dialogue]
    if not long_rows:
        return None
    dialogues = [r["dialogue"] for r in long_rows]
    ref = score_samples([r["summary"] for r in long_rows], dialogues, encoder="", input_limit_words=limit).rows
    bart = score_samples([by_dialogue[r["dialogue"]] for r in long_rows], dialogues, encoder="",
                         input_limit_words=limit).rows
    out = {"dialogues": len(long_rows), "limit_words": limit,
           "dialogue_words_median": float(np.median([len(d.split()) for d in dialogues]))}
    for column in ("coverage_begin", "coverage_middle", "coverage_end", "middle_recall", "coverage_beyond_limit"):
        a, b, dropped = paired_values(ref, bart, column)
        if not a:
            continue
        result = paired_bootstrap(a, b, n_samples=2000)
        out[column] = {"reference": result.mean_a, "truncated_bart": result.mean_b, "difference": result.difference,
                       "low": result.low, "high": result.high, "p_value": result.p_value, "n": result.n,
                       "dropped": dropped}
    return out


def main(argv=None) -> dict:
    cfg = configure(globals(), argv)
    import torch
    from finetuneflow.contract.paths import resolve
    from finetuneflow.quality import faithfulness as F
    from finetuneflow.quality.encoder import load_encoder
    torch.set_num_threads(cfg.THREADS)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    encoder, note = load_encoder(cfg.ENCODER)
    print(f"encoder: {note if encoder else 'none: ' + note}")
    rows = read_jsonl(resolve(cfg.DIALOGSUM))
    if cfg.N_ROWS:
        rows = rows[:cfg.N_ROWS]
    corrupted = corrupt(rows, cfg.SEED)
    counts = {c: sum(1 for x in corrupted if x[c]) for c in CORRUPTIONS}
    print(f"DialogSum: {len(rows)} references; corrupted versions: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    refs, ref_flags, corrupted_flags, corrupted_rows = score_set(rows, corrupted, encoder or "", None)
    for n in refs.notes:
        print(f"note: {n}")
    dev = list(range(min(cfg.DEV_ROWS, len(rows))))
    held = list(range(len(dev), len(rows)))
    record = {"dialogsum": {"rows": len(rows), "corrupted": counts, "encoder": note if encoder else None}}
    for name, idx in (("dev (thresholds chosen here)", dev), ("held-out", held), ("all", list(range(len(rows))))):
        if not idx:
            continue
        table = flag_table(ref_flags, corrupted_flags, idx)
        print("\n" + markdown(table, f"DialogSum dev rows {idx[0]}-{idx[-1]}, {name}"))
        record["dialogsum"][name.split(" ")[0]] = {"table": table, "verdicts": verdicts(table)}
    support = [refs.rows[i]["support_min"] for i in dev if refs.rows[i]["support_min"] is not None]
    if support:
        import numpy as np
        appended_rows = corrupted_rows["sentence_append"]
        appended = [appended_rows[i]["support_min"] for i in dev
                    if i in appended_rows and appended_rows[i]["support_min"] is not None]
        quantiles = {q: float(np.quantile(support, q)) for q in (0.03, 0.05, 0.08, 0.10)}
        record["dialogsum"]["dev_reference_support_min_quantiles"] = quantiles
        print("\ndev references' support_min quantiles (for SUPPORT_THRESHOLD): " + ", ".join(
            f"{q:.0%}: {v:.3f} (flags {np.mean(np.array(appended) < v):.0%} of appended)"
            for q, v in quantiles.items()))
    decided = record["dialogsum"]["held-out" if held else "dev"]["verdicts"]
    shipped = tuple(c for c, v in decided.items() if v["shipped"])
    record["shipped_checks"] = shipped
    print(f"\nshipped (held-out half meets >= 80% detection, <= 10% false alarms): {', '.join(shipped) or 'none'}")
    print(f"experimental: {', '.join(c for c in decided if c not in shipped) or 'none'}")
    if set(shipped) != set(F.SHIPPED_CHECKS):
        print(f"WARNING: faithfulness.SHIPPED_CHECKS is {F.SHIPPED_CHECKS}; this run says {shipped}")
    record["examples"] = examples(rows, corrupted, corrupted_rows, refs.rows)
    if cfg.HIGHLIGHTSUM:
        hs = read_jsonl(resolve(cfg.HIGHLIGHTSUM))
        hs_corrupted = corrupt(hs, cfg.SEED)
        hs_refs, hs_flags, hs_cflags, _ = score_set(hs, hs_corrupted, encoder or "", None)
        ami = [i for i, r in enumerate(hs) if r["dialogue"].startswith("Speaker ")]
        chats = [i for i in range(len(hs)) if i not in set(ami)]
        record["highlightsum"] = {"rows": len(hs), "ami_meetings": len(ami),
                                  "corrupted": {c: sum(1 for x in hs_corrupted if x[c]) for c in CORRUPTIONS}}
        for name, idx in (("all 200", list(range(len(hs)))), (f"{len(ami)} AMI meetings", ami),
                          (f"{len(chats)} chats", chats)):
            table = flag_table(hs_flags, hs_cflags, idx)
            print("\n" + markdown(table, f"HighlightSum validation, {name}"))
            record["highlightsum"][name] = {"table": table, "verdicts": verdicts(table)}
        if cfg.SEED_PREDICTIONS:
            cov = coverage_check(hs, resolve(cfg.SEED_PREDICTIONS), encoder, cfg.INPUT_LIMIT_WORDS)
            record["coverage_truncation"] = cov
            if cov:
                print(f"\nCoverage on the {cov['dialogues']} HighlightSum dialogues longer than {cov['limit_words']} "
                      f"words (median {cov['dialogue_words_median']:.0f} words): reference vs the seed's truncated "
                      f"bart-large-cnn")
                print("| column | reference | truncated BART | difference (95% CI) |\n|---|---:|---:|---|")
                for column, v in cov.items():
                    if isinstance(v, dict):
                        print(f"| {column} | {v['reference']:.3f} | {v['truncated_bart']:.3f} | {v['difference']:+.3f} "
                              f"[{v['low']:+.3f}, {v['high']:+.3f}] (n={v['n']}) |")
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    record["seconds"] = {"wall": round(wall, 1), "cpu": round(cpu, 1), "threads": torch.get_num_threads()}
    print(f"\ntime: {wall:.0f} s wall, {cpu:.0f} s CPU (process time), {torch.get_num_threads()} torch threads")
    if cfg.OUTPUT_JSON:
        from finetuneflow.contract.io import atomic_write_json
        atomic_write_json(resolve(cfg.OUTPUT_JSON), record)
    return record


def examples(rows, corrupted, corrupted_rows, ref_rows, n: int = 3) -> dict:
    """A few caught and missed corruptions per type, and false alarms, for the write-up."""
    from finetuneflow.quality.faithfulness import flags
    out = {}
    check_of = {"speaker_swap": "misattribution", "number_change": "unsupported_mentions",
                "name_insert": "unsupported_mentions", "sentence_append": "unsupported_sentence"}
    for name, by_row in corrupted_rows.items():
        check = check_of[name]
        missed = [i for i, r in by_row.items() if flags(r)[check] is False][:n]
        out[f"{name}_missed"] = [{"reference": rows[i]["summary"], "corrupted": corrupted[i][name]} for i in missed]
    for check in ("unsupported_mentions", "misattribution", "unsupported_sentence"):
        alarms = [i for i, r in enumerate(ref_rows) if flags(r)[check]][:n]
        out[f"{check}_false_alarms"] = [{"reference": rows[i]["summary"],
                                         "spans": ref_rows[i]["unsupported_spans"],
                                         "misattributed": ref_rows[i]["misattributed_examples"],
                                         "weakest": [ref_rows[i]["weakest_sentence"], ref_rows[i]["support_min"]]}
                                        for i in alarms]
    return out


if __name__ == "__main__":
    run_cli(main)
