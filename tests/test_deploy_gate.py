"""The deploy gate (finetuneflow/ship/deploy_gate.py) and the exports it judges, run as a user runs
them: a tiny Llama dressed as post_merge_cleanup.py's output (with the split it was trained on),
evaluated by eval_bart_lora.py, then `export_gguf.py --outtype=q8_0,q4_k_m` - one converter run,
a k-quant from an f16 intermediate, the prompt audit, parity, and every GGUF summarizing the
evaluated rows through llama.cpp, judged against the evaluation's own predictions.

Then the exported q4_k_m works like any other model: eval_bart_lora.py (its CSV compares with the
merged model's in eval_metrics_bart_lora.py), inference_bart_lora.py and serve_api.py. The gate's
judgement (paired bootstrap, verdicts, the smallest that ships), its fallback rows, REQUIRE_SHIP
and a re-run with GATE=off are checked on real numbers; bad input is one error line."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import OFFLINE_ENV, REPO, SAMPLES, error_line, files_under, run_stage
from finetuneflow.contract.decoding import MBR_FIELDS
from finetuneflow.contract.errors import UserError
from finetuneflow.ship.llama_tools import find_tool, missing

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install-llama)")
sys.path.insert(0, str(REPO))

INSTRUCTION = "Summarize this chat in one sentence."
GENERATION = {"num_beams": 1, "max_new_tokens": 12, "no_repeat_ngram_size": 3}
EVAL = ["--dataset=" + str(SAMPLES), "--split=test", "--n_samples=0"]


def dress_as_cleaned(folder, model_folder, generation=None) -> None:
    """model_folder + the run record post_merge_cleanup.py writes: prompt, decoding, the split."""
    from finetuneflow.contract.data import load_dialogues
    from finetuneflow.contract.decoding import GenerationSettings
    from finetuneflow.contract.record import Lineage, RunRecord, Split, fingerprint, write_record
    shutil.copytree(model_folder, folder)
    train = load_dialogues(str(SAMPLES), seed=42).splits["train"]
    split = Split(source=str(SAMPLES), seed=42, val_fraction=0.1, test_fraction=0.1, made_from_single_file=True,
                  train_rows=len(train), train_fingerprints=[fingerprint(d) for d in train["dialogue"]])
    record = RunRecord("post_merge_cleanup", family="causal", instruction=INSTRUCTION, max_input_length=256,
                       generation=GenerationSettings.from_record(generation or GENERATION), split=split,
                       lineage=Lineage(base_model=str(model_folder), merged_from="ft_outputs/lora"))
    write_record(folder, record)


@pytest.fixture(scope="module")
def gated(converter, tiny_models, tmp_path_factory):
    """A project: the cleaned model, its evaluation, and its q8_0 + q4_k_m export with the gate."""
    root = tmp_path_factory.mktemp("gate_project")
    dress_as_cleaned(root / "ft_outputs" / "clean", tiny_models["llama"])
    run_stage("eval_bart_lora.py", "--model=ft_outputs/clean", "--tag=merged", *EVAL, root=root)
    result = run_stage("export_gguf.py", "--model=ft_outputs/clean", "--outtype=q8_0,Q4_K_M", "--n_probes=2",
                       root=root)
    return root, result


def test_export_gates_every_type_on_the_evaluated_rows(gated):
    root, result = gated
    out = root / "ft_outputs" / "gguf"
    stems = ["clean-q8_0", "clean-q4_k_m"]
    assert files_under(out) == {f"{s}.{ext}" for s in stems for ext in ("gguf", "Modelfile", "USAGE.md",
                                                                          "export_report.json", "run_config.json")} \
        | {"clean.deploy_report.json", "clean.deploy_report.html"}      # no intermediate f16 left behind
    evaluation = json.loads((root / "metrics" / "merged_eval.json").read_text())
    report = json.loads((out / "clean.deploy_report.json").read_text())
    assert report["stage"] == "export_gguf" and report["model"] == "ft_outputs/clean"
    assert report["rows"]["count"] == evaluation["samples"] == 4
    assert report["rows"]["from"] == ("4 rows of metrics/merged_predictions.csv (the evaluation of ft_outputs/clean, "
                                      "the export's source model)")
    assert report["decoding"] == {"instruction": INSTRUCTION, "max_input_length": 256, "long_input": "truncate",
                                  "num_beams": 1, "max_new_tokens": 12, "min_new_tokens": None,
                                  "no_repeat_ngram_size": 3, "length_penalty": None, "decoding": "greedy",
                                  **dict.fromkeys(MBR_FIELDS)}
    reference = report["reference"]   # the evaluation's predictions are the transformers side: not re-run
    assert reference["how"].startswith("the predictions in metrics/merged_predictions.csv")
    assert reference["rougeL"] == pytest.approx(evaluation["averages"]["rougeL"], abs=1e-3)
    assert "deploy gate: summarizing 4 rows with the transformers model" not in result.stdout
    rows = {r["label"]: r for r in report["artifacts"]}
    assert list(rows) == ["q8_0", "q4_k_m"]
    for label, row in rows.items():
        path = out / f"clean-{label}.gguf"
        assert row["file"] == f"ft_outputs/gguf/clean-{label}.gguf" and row["runtime"] == "llama.cpp"
        assert row["bytes"] == path.stat().st_size and row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        d = row["delta_rougeL"]
        assert d["low"] <= d["mean"] <= d["high"] and d["confidence"] == 0.95
        criteria = {c["name"]: c for c in row["criteria"]}
        assert list(criteria) == ["rougeL", "unsupported_mentions", "runaway", "server"]
        assert criteria["rougeL"]["passed"] == (d["high"] >= 0) and criteria["rougeL"]["delta"] == d
        for name in ("unsupported_mentions", "runaway"):
            c = criteria[name]
            assert c["margin"] == {"unsupported_mentions": 5.0, "runaway": 3.0}[name] and c["rows"] <= 4
            assert c["passed"] == (c["delta"]["high"] <= c["margin"])
        assert criteria["runaway"]["reference_how"].startswith("estimated: the evaluation's CSV records no finish")
        assert row["failed"] == [n for n, c in criteria.items() if c["passed"] is False]
        assert row["verdict"] == ("hold" if row["failed"] else "ship")
        assert {s["finish_reason"] for s in row["summaries"]} <= {"stop", "length"}
        server = row["server"]
        if find_tool("llama-server") is None:
            assert criteria["server"]["passed"] is None and server == {"skipped": missing("llama-server")}
        else:
            assert server["compared"] == 4 - len(server["excluded"]) and len(server["summaries"]) == 4
            assert criteria["server"]["passed"] == (not server["beyond_noise"])
            assert server["how"].startswith("0.3.36 llama-server, --jinja")
        assert 0 <= row["identical_share"] <= 1 and row["identical"] == round(row["identical_share"] * 4)
        assert row["samples_per_s"] > 0 and len(row["summaries"]) == 4
        assert d["mean"] == pytest.approx(row["rougeL"] - reference["rougeL"], abs=1e-3)
        assert json.loads((out / f"clean-{label}.export_report.json").read_text())["deploy"] == row["verdict"]
    assert rows["q4_k_m"]["bytes"] < rows["q8_0"]["bytes"]
    shipping = [r for r in rows.values() if r["verdict"] == "ship"]
    assert report["smallest_shipping"] == (min(shipping, key=lambda r: r["bytes"])["file"] if shipping else None)
    # the audit ran before any score, and the Modelfile it checked is the one written
    assert report["audit"]["q4_k_m"]["passed"] is True
    side = report["audit"]["q4_k_m"]["side_by_side"]
    assert side["project_prompt"] == side["ollama_prompt"]
    assert side["project_prompt"].endswith("<|im_start|>assistant\n")
    assert re.search(r"prompt audit: [2-9] probe prompt\(s\) tokenize to the same ids", result.stdout)
    # the table is printed
    table = result.stdout[result.stdout.index("deploy gate on 4 rows"):]
    assert re.search(r"artifact +runtime +size MB +samples/s +ROUGE-1 +ROUGE-2 +ROUGE-L +ΔROUGE-L \[95% CI\] +"
                     r"unsupported % +runaway % +identical +llama-server +verdict", table)
    if find_tool("llama-server") is None:   # the skipped step: one line for the run, not one per artifact
        assert result.stdout.count(f"deploy gate: llama-server step skipped: {missing('llama-server')}") == 1
    assert "clean-q8_0.gguf" in table and "clean-q4_k_m.gguf" in table
    page = (out / "clean.deploy_report.html").read_text()
    assert "<h2>Deploy gate" in page and "clean-q4_k_m.gguf" in page and "ΔROUGE-L" in page
    assert not re.search(r"(src|href)=|<script|https?://", page)          # self-contained
    # the q4_k_m came from the quantizer, through a temporary f16
    q4 = json.loads((out / "clean-q4_k_m.export_report.json").read_text())
    assert q4["conversion"]["made_from"] == "f16" and q4["conversion"]["quantizer"]["qtype"] == "q4_k_m"
    assert q4["verification"]["passed"] is True and q4["verification"]["checks"]["audit"]["passed"] is True


def test_a_quantized_gguf_is_a_model_like_any_other(gated):
    """eval, metrics comparison, inference and the HTTP service all take the q4_k_m file."""
    root, _ = gated
    gguf = "ft_outputs/gguf/clean-q4_k_m.gguf"
    record = json.loads((root / "ft_outputs" / "gguf" / "clean-q4_k_m.run_config.json").read_text())
    assert record["generation"]["num_beams"] == 1 and record["lineage"]["exported_from"] == "ft_outputs/clean"
    run_stage("eval_bart_lora.py", f"--model={gguf}", "--tag=q4", *EVAL, root=root)
    q4 = json.loads((root / "metrics" / "q4_eval.json").read_text())
    assert q4["model"]["backend"] == "llama.cpp" and q4["model"]["dtype"] == "q4_k_m" and q4["samples"] == 4
    assert q4["generation"]["instruction"] == INSTRUCTION and q4["generation"]["max_new_tokens"] == 12   # inherited
    deploy = json.loads((root / "ft_outputs" / "gguf" / "clean.deploy_report.json").read_text())
    q4_gate = next(r for r in deploy["artifacts"] if r["label"] == "q4_k_m")
    assert q4["averages"]["rougeL"] == pytest.approx(q4_gate["rougeL"], abs=1e-3)   # the gate measured this model
    result = run_stage("eval_metrics_bart_lora.py",
                       "--predictions=metrics/merged_predictions.csv,metrics/q4_predictions.csv", "--bertscore_model=",
                       root=root)
    assert "q4 vs merged on 4 shared samples" in result.stdout
    summary = json.loads((root / "metrics" / "summary_metrics.json").read_text())
    assert json.dumps(summary).count('"q4"') >= 1 and json.dumps(summary).count('"merged"') >= 1

    dialogue = "Anna: Lunch at noon?\nBen: Sure, see you at the cafe."
    cli = run_stage("inference_bart_lora.py", f"--model={gguf}", root=root, input=dialogue)
    assert "q4_k_m on cpu" in cli.stderr + cli.stdout
    summary_cli = [line for line in cli.stdout.strip().splitlines() if not line.startswith("! ")][-1]
    env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(root), "OMP_NUM_THREADS": "1"}
    log = root / "serve.log"
    with open(log, "w") as handle:
        server = subprocess.Popen([sys.executable, str(REPO / "serve_api.py"), f"--model={gguf}", "--port=0"],
                                  cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        url, deadline = None, time.time() + 120
        while url is None and time.time() < deadline and server.poll() is None:
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", log.read_text())
            url = found.group(1) if found else None
            time.sleep(0.3)
        assert url, log.read_text()
        info = httpx.get(f"{url}/info", timeout=30).json()
        assert info["backend"] == "llama.cpp" and info["dtype"] == "q4_k_m"
        answer = httpx.post(f"{url}/summarize", json={"dialogue": dialogue}, timeout=60)
        assert answer.status_code == 200 and answer.json()["summary"] == summary_cli
        beams = httpx.post(f"{url}/summarize", json={"dialogue": dialogue, "generation": {"num_beams": 2}}, timeout=60)
        assert 400 <= beams.status_code < 500 and "no beam search" in beams.text
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_gate_off_forgets_the_report_on_the_files_it_replaces(gated):
    root, _ = gated
    out = root / "ft_outputs" / "gguf"
    keep = {p.name: p.read_bytes() for p in out.iterdir() if "q4_k_m" in p.name}
    result = run_stage("export_gguf.py", "--model=ft_outputs/clean", "--outtype=q8_0", "--gate=off", "--verify=false",
                       root=root)
    assert "removed clean.deploy_report.json and its HTML: they judged clean-q8_0.gguf" in result.stdout
    assert not (out / "clean.deploy_report.json").exists() and not (out / "clean.deploy_report.html").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir() if "q4_k_m" in p.name} == keep   # other types untouched


# ----------------------------------------------------------------------------- the judgement itself

def test_verdicts_on_known_numbers():
    from finetuneflow.ship.deploy_gate import judge, smallest_shipping
    ref = [{"rougeL": v} for v in (30.0, 40.0, 20.0, 35.0, 25.0, 30.0, 45.0, 28.0)]
    same = judge(ref, ref, ["a"] * 8, ["a"] * 8)
    assert same["delta_rougeL"]["mean"] == same["delta_rougeL"]["low"] == same["delta_rougeL"]["high"] == 0
    assert same["verdict"] == "ship" and same["identical_share"] == 1.0
    worse = judge(ref, [{"rougeL": r["rougeL"] - 5 - i % 3} for i, r in enumerate(ref)], ["a"] * 8, ["b"] * 8)
    assert worse["verdict"] == "hold" and worse["delta_rougeL"]["high"] < 0 and worse["identical"] == 0
    assert worse["delta_rougeL"]["mean"] == pytest.approx(-5.875)   # -(5 + mean of 0,1,2,0,1,2,0,1)
    noisy = judge(ref, [{"rougeL": r["rougeL"] + (4 if i % 2 else -4)} for i, r in enumerate(ref)], ["a"] * 8,
                  ["a", "b"] * 4)
    assert noisy["verdict"] == "ship" and noisy["delta_rougeL"]["low"] < 0 < noisy["delta_rougeL"]["high"]
    assert noisy["identical_share"] == 0.5
    rows = [{"file": "a", "bytes": 30, "verdict": "ship"}, {"file": "b", "bytes": 10, "verdict": "hold"},
            {"file": "c", "bytes": 20, "verdict": "ship"}, {"file": "d", "bytes": 5, "verdict": "not run"}]
    assert smallest_shipping(rows)["file"] == "c" and smallest_shipping(rows[1:2]) is None


def test_the_rate_criteria_are_non_inferiority_within_a_margin():
    """Unsupported mentions and runaways on constructed per-summary flags: the paired 95% interval's
    upper bound against the margin (points); rows without an answer on either side are left out."""
    from finetuneflow.ship.gate_verdict import Margins, hold_reason, judge, rate_criterion, rule_text
    ref = [False] * 90 + [True] * 10                       # 10% of 100 summaries
    same = rate_criterion("unsupported_mentions", ref, list(ref), 5.0)
    assert same["passed"] is True and same["rate"] == same["reference_rate"] == 10.0 and same["delta"]["high"] == 0
    twice = rate_criterion("unsupported_mentions", ref, [False] * 80 + [True] * 20, 5.0)   # the same 10, 10 more
    assert twice["passed"] is False and twice["delta"]["mean"] == 10.0 and twice["delta"]["low"] > 0
    assert (twice["count"], twice["reference_count"], twice["rows"]) == (20, 10, 100)
    one_more = rate_criterion("runaway", ref, [False] * 89 + [True] * 11, 3.0)
    assert one_more["passed"] is True and 1 <= one_more["delta"]["high"] <= 3.0      # one more in 100 passes
    swapped = rate_criterion("runaway", ref, [True] * 10 + [False] * 90, 3.0)   # same rate, other rows: noisy
    assert swapped["delta"]["mean"] == 0 and swapped["delta"]["high"] > 3.0 and swapped["passed"] is False
    unknown = rate_criterion("unsupported_mentions", [None, True], [False, None], 5.0)
    assert unknown["passed"] is None and unknown["skipped"] == "no summary could be checked on both sides"
    assert rule_text(Margins(5.0, 3.0))["runaway"].endswith("is <= +3 points")
    scores = [{"rougeL": 30.0}] * 100
    server = {"name": "server", "passed": False, "beyond_noise": ["7"], "first_difference": {"id": "7"}}
    verdict = judge(scores, scores, ["a"] * 100, ["a"] * 100, (twice, one_more, server))
    assert verdict["failed"] == ["unsupported_mentions", "server"] and verdict["verdict"] == "hold"
    assert [c["name"] for c in verdict["criteria"]] == ["rougeL", "unsupported_mentions", "runaway", "server"]
    assert hold_reason({"label": "q3_k_m", **verdict}) == (
        f"q3_k_m holds (unsupported mentions 20% vs 10%, Δ CI upper bound {twice['delta']['high']:+.1f} > +5 points; "
        f"llama-server differs from the in-process backend beyond batch noise on 1 row(s), first 7)")
    skipped = judge(scores, scores, ["a"] * 100, ["a"] * 100, (one_more, {"name": "server", "passed": None}))
    assert skipped["verdict"] == "ship" and skipped["failed"] == []    # a criterion not measured does not hold


def test_server_parity_counts_batch_noise_from_the_in_process_run_alone():
    """A row may differ from the server only where the in-process text alone (batch size 1) differs
    from the batched one; any other differing row is beyond noise, and the first is shown."""
    from finetuneflow.ship.gate_server import compare, server_lines
    from finetuneflow.ship.gate_verdict import server_criterion
    rows = [{"id": str(i)} for i in range(6)]
    batched = ["a", "b", "c", "d", "e", "f"]
    served = ["a", "B", "c", "D", "e", "F"]
    alone = {1: "b2", 3: "d", 5: "F"}           # rows 1 and 5 change alone: noise; row 3 does not
    out = compare(rows, batched, served, excluded=[4], alone=alone)
    assert (out["compared"], out["identical"], out["identical_share"]) == (5, 2, 0.4)
    assert out["differing"] == ["1", "3", "5"] and out["noise"] == ["1", "5"] and out["beyond_noise"] == ["3"]
    assert out["excluded"] == ["4"] and out["alone_equals_server"] == 1
    assert out["first_difference"] == {"id": "3", "in_process": "d", "in_process_alone": "d", "server": "D"}
    criterion = server_criterion({**out, "rougeL": 12.5, "runaway": 0})
    assert criterion["passed"] is False
    lines = server_lines("q8_0", {**out, "rougeL": 12.5})
    assert lines[1] == "  q8_0: HOLD: llama-server differs beyond batch noise on 1 row(s); first, row 3:"
    assert lines[2:] == ["    in-process:   'd'", "    llama-server: 'D'"]
    assert server_criterion({"skipped": "llama-server not found"})["passed"] is None
    assert server_criterion({**compare(rows, batched, batched, [], {}), "rougeL": 1.0})["passed"] is True


def test_llama_cpp_reruns_a_beam_evaluation_greedily():
    from finetuneflow.contract.decoding import GenerationSettings
    from finetuneflow.ship.deploy_gate import Decoding
    evaluated = Decoding("x", 256, "truncate", GenerationSettings(num_beams=4, max_new_tokens=20, length_penalty=2.0))
    greedy, note = evaluated.for_runtime("llama.cpp")
    assert greedy.generation == GenerationSettings(num_beams=1, max_new_tokens=20, length_penalty=2.0)
    assert greedy != evaluated and note == ("evaluated with num_beams=4; llama.cpp (and Ollama) decode greedily, so "
                                            "both sides run greedily here")
    assert evaluated.for_runtime("ctranslate2") == (evaluated, None)      # CTranslate2 has beam search


def test_fallback_rows_are_held_out_and_training_rows_are_counted(tiny_models, tmp_path):
    """No evaluation to reuse: rows of the test split of the data the model was trained on; rows it
    was trained on (a record that lists some test rows as training rows) are dropped and counted."""
    from finetuneflow.contract.data import load_dialogues
    from finetuneflow.contract.record import fingerprint, portable, read_record, write_record
    from finetuneflow.ship.deploy_gate import held_out_rows
    from finetuneflow.ship.source import inspect_model_folder
    folder = tmp_path / "clean"
    dress_as_cleaned(folder, tiny_models["llama"])
    test = load_dialogues(str(SAMPLES), seed=42).splits["test"]
    record = read_record(folder)
    record.split.train_fingerprints.append(fingerprint(test[0]["dialogue"]))
    write_record(folder, record)
    rows, where, notes = held_out_rows(inspect_model_folder(folder, produced_by="x"), 32, "unused", "test", 42)
    assert where == f"{len(test) - 1} held-out rows of the test split of {portable(str(SAMPLES))}"
    assert notes == [f"1 of the {len(test)} rows were training rows and were dropped"]
    assert {r["id"] for r in rows} == set(test["id"]) - {test[0]["id"]}


def test_require_ship_with_a_hold_writes_nothing(gated, monkeypatch, capsys):
    from export_gguf import main
    from hostile import snapshot
    from finetuneflow.ship import deploy_gate
    root, _ = gated
    real = deploy_gate.judge

    def hold(*args):   # the real numbers, then a verdict as if the interval were below 0
        return {**real(*args), "verdict": "hold", "criteria": [], "failed": ["rougeL"],
                "delta_rougeL": {"mean": -3.0, "low": -5.5, "high": -0.5}}
    monkeypatch.setattr(deploy_gate, "judge", hold)
    before = snapshot(root)
    with pytest.raises(UserError) as error:
        main([f"--model={root / 'ft_outputs' / 'clean'}", "--outtype=q4_k_m", "--require_ship=True", "--n_probes=1",
              f"--output_dir={root / 'ft_outputs' / 'gguf_strict'}", "--gate_samples=2",
              f"--gate_eval={root / 'metrics' / 'merged_eval.json'}"])
    assert str(error.value) == ("deploy gate: q4_k_m holds (ROUGE-L -3.00, 95% CI [-5.50, -0.50]) on 2 rows; nothing "
                                "was written (REQUIRE_SHIP=True: every artifact must ship; drop that type or pass "
                                "--REQUIRE_SHIP=False to write it with its verdict)")
    assert snapshot(root) == before and not (root / "ft_outputs" / "gguf_strict").exists()
    assert "q4_k_m" in capsys.readouterr().out          # the table was printed before the refusal


# ----------------------------------------------------------------------------- bad input

def test_a_chat_template_the_gguf_would_not_use_fails_the_export(converter, tiny_models, tmp_path):
    """tokenizer_config.json's chat_template (what llama.cpp's converter embeds) differs from
    chat_template.jinja (what transformers, and so training and evaluation, use): the audit names
    the first differing token and nothing is written."""
    folder = tmp_path / "ft_outputs" / "clean"
    dress_as_cleaned(folder, tiny_models["llama"])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}" + \
        (folder / "chat_template.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for unverified in ([], ["--verify=false"]):   # unverified but gated: the audit still runs before any score
        result = run_stage("export_gguf.py", "--model=ft_outputs/clean", "--outtype=q8_0", "--n_probes=1",
                           *unverified, root=tmp_path, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert re.fullmatch(r"error: GGUF audit failed: prompt \(dialogue 0, the GGUF's chat template\): token 1 "
                            r"differs: project '[^']+' \(\d+\) vs llama\.cpp '[^']+' \(\d+\) \(\+\d+ more in the "
                            r"audit report\)", error_line(result))
        assert not (tmp_path / "ft_outputs" / "gguf").exists()


def test_gate_settings_are_checked_before_anything_runs(gated, tmp_path):
    root, _ = gated
    cases = {
        "--gate_eval=metrics/absent_eval.json": "GATE_EVAL=metrics/absent_eval.json: ",
        "--gate_samples=0": "--GATE_SAMPLES=0: out of range",
        "--gate=maybe": "--GATE=maybe: must be one of on, off",
        "--outtype=q8_0,q3_k_s": "--OUTTYPE=q3_k_s: must be one of f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, "
                                 "iq4_xs, q3_k_m, auto",
    }
    (root / "metrics" / "stale_predictions.csv").write_text((root / "metrics" / "merged_predictions.csv").read_text()
                                                            + "extra,row,,,,,,,,\n")
    shutil.copy(root / "metrics" / "merged_eval.json", root / "metrics" / "stale_eval.json")
    cases["--gate_eval=metrics/stale_predictions.csv"] = ("GATE_EVAL: stale_predictions.csv changed after "
                                                          "stale_eval.json was written (its sha256 differs)")
    before = {p: p.stat().st_mtime_ns for p in (root / "ft_outputs").rglob("*")}
    for flag, message in cases.items():
        result = run_stage("export_gguf.py", "--model=ft_outputs/clean", "--output_dir=ft_outputs/gguf", flag,
                           root=root, check=False)
        assert result.returncode == 2 and message in error_line(result), (flag, result.stderr[-500:])
    assert {p: p.stat().st_mtime_ns for p in (root / "ft_outputs").rglob("*")} == before


# ----------------------------------------------------------------------------- llama-server

needs_server = pytest.mark.skipif(find_tool("llama-server") is None,
                                  reason=f"{missing('llama-server')} (CI builds it: make install-llama-tools)")


def fake_server(folder, script: str):
    """FTF_LLAMA_TOOLS=<folder> with a `llama-server` that runs `script` (bash) instead."""
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / "llama-server"
    program.write_text("#!/usr/bin/env bash\n" + script + "\n")
    program.chmod(0o755)
    return {"FTF_LLAMA_TOOLS": str(folder)}


def alive(pid: int) -> bool:
    """A running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_gate_killed_mid_server_leaves_no_server_running(gated, tmp_path, sig):
    """The gate is stopped while its llama-server is up (a stand-in that never answers /health):
    the export ends, writes nothing, and the server process is gone."""
    root, _ = gated
    pidfile = tmp_path / "server.pid"
    env = {**os.environ, **OFFLINE_ENV, "FTF_ROOT": str(root),
           **fake_server(tmp_path / "tools", f'echo $$ > {pidfile}\nexec sleep 300')}
    out = root / "ft_outputs" / "gguf_killed"
    gate = subprocess.Popen([sys.executable, str(REPO / "export_gguf.py"), "--model=ft_outputs/clean",
                             "--outtype=q8_0", "--verify=false", f"--output_dir={out}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not pidfile.exists() and time.time() < deadline and gate.poll() is None:
        time.sleep(0.2)
    assert pidfile.exists(), gate.communicate()[0][-3000:]
    server = int(pidfile.read_text())
    assert alive(server)
    gate.send_signal(sig)
    output, _ = gate.communicate(timeout=60)
    assert gate.returncode != 0 and "Traceback" not in output, output[-3000:]
    for _ in range(50):
        if not alive(server):
            break
        time.sleep(0.1)
    assert not alive(server), "llama-server outlived the gate"
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_a_server_that_fails_holds_the_artifact_and_is_gone(gated, tmp_path):
    """llama-server exits on the file (as a server of another llama.cpp version would on a new
    architecture): the artifact is held with the server's own error line, nothing is left running."""
    root, _ = gated
    pidfile = tmp_path / "server.pid"
    tools = fake_server(tmp_path / "tools", f"echo $$ > {pidfile}\necho 'error: unknown model architecture: x' >&2\n"
                                            f"exit 1")
    result = run_stage("export_gguf.py", "--model=ft_outputs/clean", "--outtype=q8_0", "--verify=false",
                       "--output_dir=ft_outputs/gguf_failed", root=root, env=tools)
    assert "q8_0: HOLD: llama-server exited with code 1 on " in result.stdout
    assert "error: unknown model architecture: x" in result.stdout
    report = json.loads((root / "ft_outputs" / "gguf_failed" / "clean.deploy_report.json").read_text())
    row = report["artifacts"][0]
    assert row["verdict"] == "hold" and "server" in row["failed"] and "failed" in row["server"]
    assert not alive(int(pidfile.read_text()))


@pytest.mark.slow
@needs_server
def test_a_chat_template_the_server_renders_otherwise_is_held(gated, tmp_path):
    """The server renders another chat template than the GGUF's (as a runtime whose own template
    overrides the file's does): here the real llama-server, given `--chat-template-file` with a
    template that adds words after the assistant tag. The prompt audit (transformers, the GGUF's
    template, the Modelfile) passes; the server's summaries differ and the gate holds the file with
    the first differing row printed."""
    from finetuneflow.model.tiny import CHATML_TEMPLATE
    root, _ = gated
    real = find_tool("llama-server")
    template = tmp_path / "other.jinja"
    template.write_text(CHATML_TEMPLATE.replace("{{ '<|im_start|>assistant\n' }}",
                                                "{{ '<|im_start|>assistant\nIn short, in one line:' }}"))
    assert template.read_text() != CHATML_TEMPLATE
    tools = fake_server(tmp_path / "tools", f'exec {real} "$@" --chat-template-file {template}')
    for other in ("llama-quantize", "llama-imatrix"):
        if find_tool(other):
            (tmp_path / "tools" / other).symlink_to(find_tool(other))
    result = run_stage("export_gguf.py", "--model=ft_outputs/clean", "--outtype=q8_0", "--n_probes=1",
                       "--output_dir=ft_outputs/gguf_other", root=root, env=tools)
    assert "prompt audit: " in result.stdout and "tokenize to the same ids" in result.stdout
    lines = result.stdout.splitlines()
    hold = next(i for i, line in enumerate(lines) if "q8_0: HOLD: llama-server differs beyond batch noise" in line)
    assert lines[hold + 1].startswith("    in-process:   '") and lines[hold + 2].startswith("    llama-server: '")
    report = json.loads((root / "ft_outputs" / "gguf_other" / "clean.deploy_report.json").read_text())
    row = report["artifacts"][0]
    assert row["verdict"] == "hold" and "server" in row["failed"]
    first = row["server"]["first_difference"]
    assert first["id"] == row["server"]["beyond_noise"][0] and first["server"] != first["in_process"]
