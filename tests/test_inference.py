"""inference_bart_lora.py and finetuneflow/long_input.py: windows that fit and keep turn
boundaries, the three LONG_INPUT modes, every input/output format, identical summaries from
the adapter and the clean merged folder, and one clear line for bad input."""
from __future__ import annotations

import csv
import json
import re
import shutil

import pytest

from conftest import SAMPLES, error_line, run_stage
from tests.adapters import make_adapter

import inference_bart_lora
import merge_bart_lora
import post_merge_cleanup
from finetuneflow.contract.errors import UserError
from finetuneflow.engine.generation import GenerationSettings, summarize
from finetuneflow.engine.long_input import input_tokens, split_into_windows, summarize_long
from finetuneflow.ship.cleanup import capture_warnings
from finetuneflow.model.loading import load_model

ROWS = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()]
LONG = next(r["dialogue"] for r in ROWS if r["id"] == "sample-long-meeting")
SHORT = [r for r in ROWS if len(r["dialogue"]) < 500][:3]


@pytest.fixture(scope="module")
def folders(tiny_models, tmp_path_factory) -> dict:
    """adapter -> merged -> clean for the tiny BART (max_input_length 512: only the long sample is over)."""
    root = tmp_path_factory.mktemp("inference")
    adapter = make_adapter(tiny_models["bart"], root / "lora", max_input_length=512)
    merge_bart_lora.main([f"--adapter={adapter}", f"--output_dir={root / 'merged'}", f"--metrics_dir={root}"])
    post_merge_cleanup.main([f"--merged_dir={root / 'merged'}", f"--output_dir={root / 'clean'}"])
    return {"adapter": adapter, "clean": root / "clean"}


@pytest.fixture(scope="module")
def llama(tiny_models):
    return load_model(str(tiny_models["llama"]), device="cpu")


def test_windows_fit_the_limit_and_keep_turns(tiny_models, llama):
    bart = load_model(str(tiny_models["bart"]), device="cpu")
    for loaded in (bart, llama):
        assert input_tokens(loaded, [LONG])[0] > 1000
        windows = split_into_windows(loaded, LONG, max_input_length=512)
        sizes = input_tokens(loaded, windows)
        assert len(windows) > 4 and max(sizes) <= 512 and min(sizes) > 512 // 3
        # every turn stays whole and in order: the windows' lines are the dialogue's lines
        assert [line for w in windows for line in w.split("\n")] == [t for t in LONG.split("\n") if t.strip()]
    assert split_into_windows(llama, SHORT[0]["dialogue"], 512) == [SHORT[0]["dialogue"]]


def test_an_overlong_turn_is_split_at_sentences_with_its_speaker(llama):
    sentences = [f"Point number {i} is about the {w} budget and it matters." for i, w in
                 zip(range(60), ["red", "blue", "green", "small", "large", "shared"] * 10)]
    dialogue = "Speaker A: " + " ".join(sentences) + "\nSpeaker B: Agreed, let us move on."
    windows = split_into_windows(llama, dialogue, max_input_length=160)
    assert len(windows) > 2 and max(input_tokens(llama, windows)) <= 160
    assert windows[-1].split("\n")[-1] == "Speaker B: Agreed, let us move on."   # the next turn stays whole
    parts = [w.split("\nSpeaker B")[0] for w in windows if not w.startswith("Speaker B")]
    assert all(p.startswith("Speaker A: ") for p in parts)             # the speaker is repeated mid-turn
    body = " ".join(re.sub(r"^Speaker A: ", "", p) for p in parts)
    assert body == " ".join(sentences)                                  # cut only between sentences


def test_long_input_modes(llama):
    dialogues = [LONG] + [r["dialogue"] for r in SHORT]
    settings = GenerationSettings(max_new_tokens=8)
    with capture_warnings() as warned:
        chunked = summarize_long(llama, dialogues, settings, max_input_length=512, mode="chunk", progress=False)
    assert not [w for w in warned if "sequence length" in w or "truncat" in w.lower()], warned
    assert chunked.chunked == 1 and chunked.windows[0] > 4 and chunked.windows[1:] == [1, 1, 1]
    assert chunked.truncated == [False] * 4 and all(chunked.summaries)
    plain = summarize_long(llama, dialogues, settings, max_input_length=512, mode="truncate", progress=False)
    assert plain.chunked == 0 and plain.truncated[0] and not any(plain.truncated[1:])
    assert plain.summaries[1:] == chunked.summaries[1:]                # fitting inputs: same engine path
    assert plain.summaries == summarize(llama, dialogues, settings, max_input_length=512, progress=False).summaries
    # chunk_join: the long dialogue's summary is its window summaries in order; the others are unchanged
    joined = summarize_long(llama, dialogues, settings, max_input_length=512, mode="chunk_join", progress=False)
    windows = split_into_windows(llama, LONG, max_input_length=512)
    per_window = summarize(llama, windows, settings, max_input_length=512, progress=False).summaries
    assert joined.summaries[0] == " ".join(s.strip() for s in per_window if s.strip())
    assert joined.summaries[1:] == chunked.summaries[1:] and joined.windows == chunked.windows
    assert joined.truncated == [False] * 4 and joined.chunked == 1
    with pytest.raises(UserError, match="dialogue id 'long-one'.*LONG_INPUT=chunk"):
        summarize_long(llama, dialogues, settings, max_input_length=512, mode="error",
                       ids=["long-one", "a", "b", "c"])


def test_inference_stdin_files_and_adapter_equals_clean(folders, project, tmp_path):
    shutil.copytree(folders["clean"], project / "ft_outputs" / "bart_merged_clean")
    result = run_stage("inference_bart_lora.py", "--model=ft_outputs/bart_merged_clean", root=project,
                       input=SHORT[0]["dialogue"] + "\n", env={"OMP_NUM_THREADS": "1"})
    printed = "\n".join(line for line in result.stdout.strip().splitlines() if not line.startswith("! "))
    assert printed and "0 chunked into windows, 0 truncated" in result.stderr

    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"sample_id": r["id"], "text": r["dialogue"]}) + "\n"
                            for r in SHORT + [{"id": "blank", "dialogue": "  "}, {"id": "long", "dialogue": LONG}]))
    outputs = {}
    for name in ("clean", "adapter"):
        out = tmp_path / f"{name}.jsonl"
        summary = inference_bart_lora.main([f"--model={folders[name]}", f"--input_file={data}",
                                            f"--output_file={out}", "--long_input=chunk"])
        assert summary["chunked"] == 1 and summary["truncated"] == 0
        outputs[name] = [json.loads(line) for line in out.read_text().splitlines()]
        sidecar = json.loads((tmp_path / f"{name}.jsonl.run_config.json").read_text())
        assert sidecar["generation"]["num_beams"] == 2 and sidecar["skipped"] == ["blank"]
    assert [r["summary"] for r in outputs["clean"]] == [r["summary"] for r in outputs["adapter"]]
    first = outputs["clean"][0]
    assert set(first) == {"id", "summary", "chunked", "windows", "truncated", "generation", "checks_flagged",
                          "checks_spans", "checks_notes"}
    assert first["checks_flagged"] in ("yes", "no") and "no check is validated" in outputs["clean"][-1]["checks_notes"]
    assert first["id"] == SHORT[0]["id"] and first["summary"].splitlines() == printed.splitlines()
    assert first["generation"]["max_new_tokens"] == 24 and outputs["clean"][-1]["chunked"] is True

    table = tmp_path / "in.csv"
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fname", "conversation"])
        writer.writerows([[r["id"], r["dialogue"]] for r in SHORT])
    inference_bart_lora.main([f"--model={folders['clean']}", f"--input_file={table}", "--text_column=conversation",
                              f"--output_file={tmp_path / 'out.csv'}", "--max_new_tokens=6"])
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == [r["id"] for r in SHORT]
    assert json.loads(rows[0]["generation"])["max_new_tokens"] == 6


def test_inference_bad_input(folders, project, tmp_path):
    empty = project / "empty.txt"
    empty.write_text("")
    result = run_stage("inference_bart_lora.py", f"--model={folders['clean']}", "--input_file=empty.txt",
                       root=project, check=False, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and error_line(result) == f"error: {empty} is empty: nothing to summarize"
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Ren\u00e9: \u00e7a va?".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text .*re-save it as UTF-8"):
        inference_bart_lora.main([f"--model={folders['clean']}", f"--input_file={latin}"])
    with pytest.raises(UserError, match="no column 'body'"):
        inference_bart_lora.main([f"--model={folders['clean']}", f"--input_file={SAMPLES}", "--text_column=body"])
    with pytest.raises(UserError, match="use a .jsonl or .csv file"):
        inference_bart_lora.main([f"--model={folders['clean']}", "--text=hi", "--output_file=out.txt"])
    with pytest.raises(UserError, match="model not found"):
        inference_bart_lora.main(["--model=ft_outputs/nothing_here", "--text=hi"])
    orphan = tmp_path / "orphan"
    shutil.copytree(folders["adapter"], orphan)
    run_config = json.loads((orphan / "run_config.json").read_text())
    run_config["lineage"]["base_model"] = str(tmp_path / "gone")
    (orphan / "run_config.json").write_text(json.dumps(run_config))
    with pytest.raises(UserError, match="gone .*not found.*--BASE_MODEL"):
        inference_bart_lora.main([f"--model={orphan}", "--text=hi"])
    with pytest.raises(UserError, match="needs .* input tokens, more than MAX_INPUT_LENGTH=512"):
        inference_bart_lora.main([f"--model={folders['clean']}", f"--text={LONG}", "--long_input=error"])


def test_a_control_sees_every_window_and_changes_nothing(llama):
    """With a Control the engine runs batch by batch: the same summaries as without one, every
    window announced as a Part, and a cancel stops the work before the next batch."""
    from finetuneflow.engine.long_input import Cancelled, Control
    dialogues = [LONG, SHORT[0]["dialogue"], LONG[:2500]]
    settings = GenerationSettings(max_new_tokens=6)
    plain = summarize_long(llama, dialogues, settings, batch_size=3, max_input_length=256, mode="chunk",
                           progress=False)

    class Watch(Control):
        def __init__(self, stop_after=None):
            self.parts, self.batches, self.stop_after = [], 0, stop_after

        def check(self):
            if self.stop_after is not None and self.batches >= self.stop_after:
                raise Cancelled("deadline")

        def run(self, call):
            self.batches += 1
            return call()

        def part(self, part):
            self.parts.append(part)

    watch = Watch()
    watched = summarize_long(llama, dialogues, settings, batch_size=3, max_input_length=256, mode="chunk",
                             progress=False, control=watch)
    assert watched.summaries == plain.summaries and watched.windows == plain.windows
    assert watched.generated_tokens == plain.generated_tokens and watched.settings == plain.settings
    first_level = [p for p in watch.parts if p.level == 0 and not p.final]
    for index, windows in enumerate(plain.windows):
        if windows > 1:
            assert sorted(p.part for p in first_level if p.dialogue == index) == list(range(1, windows + 1))
    finals = {p.dialogue: p.summary for p in watch.parts if p.final}
    assert finals == dict(enumerate(plain.summaries))
    assert all(p.input_tokens > 0 and p.finish_reason in ("stop", "length") for p in watch.parts)
    stopped = Watch(stop_after=2)
    with pytest.raises(Cancelled, match="deadline"):
        summarize_long(llama, dialogues, settings, batch_size=3, max_input_length=256, mode="chunk", progress=False,
                       control=stopped)
    assert stopped.batches == 2 and watch.batches > 2


def test_every_row_of_a_file_is_read_parquet_too(folders, tmp_path):
    import pandas as pd
    rows = [{"id": f"r{i}", "dialogue": r["dialogue"]} for i, r in enumerate(SHORT * 3)] + [{"id": "empty",
                                                                                          "dialogue": None}]
    data = tmp_path / "all.parquet"
    pd.DataFrame(rows).to_parquet(data)
    out = tmp_path / "all.jsonl"
    result = inference_bart_lora.main([f"--model={folders['clean']}", f"--input_file={data}", f"--output_file={out}",
                                       "--max_new_tokens=4"])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == [f"r{i}" for i in range(9)] and result["skipped"] == ["empty"]
    record = json.loads((tmp_path / "all.jsonl.run_config.json").read_text())
    assert record["rows"] == 10 and record["skipped"] == ["empty"]


def test_the_cli_does_not_import_the_web_stack():
    import subprocess
    import sys
    from conftest import REPO
    code = ("import sys; import inference_bart_lora; "
            "print(sorted(m for m in ('fastapi', 'pydantic', 'starlette', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_long_input_is_parsed_once_and_every_mode_counts_its_speedups(llama):
    """LONG_INPUT becomes a typed value (a bad one is one line); a map-reduce run counts the exact
    speed-ups of every engine call it makes, chunk_join included (they used to be left out)."""
    from finetuneflow.contract.decoding import LongInput
    assert [LongInput.parse(m).windows for m in LongInput.MODES] == [False, True, True, False]
    assert LongInput.parse("chunk_join").joins and not LongInput.parse("chunk").joins
    with pytest.raises(UserError, match=r"^LONG_INPUT='chunked' is not one of truncate, chunk, chunk_join, error$"):
        summarize_long(llama, [LONG], mode="chunked")
    settings = GenerationSettings(max_new_tokens=4)
    for mode in ("chunk", "chunk_join"):
        result = summarize_long(llama, [LONG, "A: hi\nB: hello there"], settings, batch_size=4, max_input_length=256,
                                mode=mode, progress=False)
        assert result.chunked == 1 and result.speedups.get("prefix_cache", 0) >= 1, (mode, result.speedups)


def test_flagged_summaries_get_a_bang_line_and_columns(tiny_models, tmp_path, monkeypatch, capsys):
    """CHECKS=True (the default): a summary that invents a name ("Ben") gets a "!" line under it on
    stdout and the checks_* columns in the output file (offsets into the summary); CHECKS=False
    leaves them out; a failing check never fails the run."""
    from tests.scripted import DIALOGUE, INVENTED, scripted_model
    model = scripted_model(tiny_models["llama"])
    monkeypatch.setattr(inference_bart_lora, "load_for_inference", lambda *args, **kwargs: model)
    inference_bart_lora.main([f"--model={tiny_models['llama']}", f"--text={DIALOGUE}", "--checks_encoder="])
    printed = capsys.readouterr().out.splitlines()
    assert printed == [INVENTED, "! 'Ben': name not in the dialogue"]
    out = tmp_path / "out.csv"
    inference_bart_lora.main([f"--model={tiny_models['llama']}", f"--text={DIALOGUE}", "--checks_encoder=",
                              f"--output_file={out}"])
    with open(out, newline="", encoding="utf-8") as handle:
        row = next(csv.DictReader(handle))
    span = json.loads(row["checks_spans"])[0]
    assert row["checks_flagged"] == "yes" and INVENTED[span["start"]:span["end"]] == span["text"] == "Ben"
    record = json.loads((tmp_path / "out.csv.run_config.json").read_text())
    assert record["checks"]["flagged"] == 1 and record["checks"]["errors"] == 0
    inference_bart_lora.main([f"--model={tiny_models['llama']}", f"--text={DIALOGUE}", "--checks=false"])
    assert capsys.readouterr().out.splitlines() == [INVENTED]

    import finetuneflow.quality.faith_report as faith_report

    def broken(*args, **kwargs):
        raise RuntimeError("no luck")
    monkeypatch.setattr(faith_report, "check_summary", broken)
    inference_bart_lora.main([f"--model={tiny_models['llama']}", f"--text={DIALOGUE}", "--checks_encoder="])
    assert capsys.readouterr().out.splitlines() == [INVENTED, "! checks failed: RuntimeError: no luck"]
