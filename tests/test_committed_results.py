"""The committed results are portable: no file under results/ names a folder of the machine that made
it (paths are relative to the project root, `../shared/data/...` for the shared data beside it), and
the report writers name files that way too."""
from __future__ import annotations

import re

import pytest

from conftest import REPO

TEXT_SUFFIXES = (".json", ".csv", ".html", ".md", ".txt", ".yaml")
# an absolute POSIX path as a value/cell/token ("/work/...", "/root/...", "/tmp/x/..."), or a Windows
# drive path; URLs ("https://...") and closing tags ("</td>") are not tokens that start with "/"
ABSOLUTE = re.compile(r"""(?:^|[\s"'>,(=\[])(/(?!/)[\w.~-]+/[\w./~-]*)|\b[A-Za-z]:\\\\?[\w.-]+""", re.M)
MACHINE_FOLDERS = ("/work/", "/root/", "/home/", "/tmp/", "/Users/", "/content/")


def absolute_paths(text: str) -> list[str]:
    return [m.group(0).lstrip(" \t\r\n\"'>,(=[") for m in ABSOLUTE.finditer(text)]


def committed_text_files():
    return sorted(p for p in (REPO / "results").rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def test_the_pattern_finds_absolute_paths_and_nothing_else():
    found = absolute_paths(
        '{"file": "/work/exp/ev/outputs/a.csv", "b": "../shared/data/x.jsonl", "u": "https://hf.co/x/y"}\n'
        '/tmp/run/x.csv,seed\n<td>/home/me/m</td></tr> and/or 1/2 C:\\Users\\me')
    assert found == ["/work/exp/ev/outputs/a.csv", "/tmp/run/x.csv", "/home/me/m", "C:\\Users"]


@pytest.mark.parametrize("path", committed_text_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_committed_result_names_a_machine_folder(path):
    text = path.read_text(encoding="utf-8")
    found = sorted(set(absolute_paths(text)))
    found += [folder for folder in MACHINE_FOLDERS if folder in text and not any(folder in f for f in found)]
    assert not found, f"{path.relative_to(REPO)} holds absolute paths {found[:5]}: write them relative to the " \
                      f"project root"


def test_reports_name_files_relative_to_the_project_root(tmp_path):
    from finetuneflow.contract.paths import ROOT, project_relative
    from finetuneflow.contract.record import portable
    assert project_relative(ROOT / "outputs" / "a_predictions.csv") == "outputs/a_predictions.csv"
    assert project_relative(ROOT.parent / "shared" / "data" / "x.csv") == "../shared/data/x.csv"
    assert project_relative("outputs/a.csv") == "outputs/a.csv"
    assert portable(ROOT / "outputs" / "a.csv") == "outputs/a.csv" and portable("../shared/x.jsonl") == \
        "../shared/x.jsonl"


def test_eval_metrics_writes_project_relative_paths(tmp_path):
    """As a user runs it: one predictions file in the project, one beside it (like ../shared/data)."""
    import csv
    import json
    from conftest import SAMPLES, run_stage
    project, beside = tmp_path / "project", tmp_path / "shared"
    rows = [json.loads(line) for line in SAMPLES.read_text(encoding="utf-8").splitlines() if line.strip()][:6]
    for path in (project / "outputs" / "a_predictions.csv", beside / "b_predictions.csv"):
        path.parent.mkdir(parents=True)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "dialogue", "reference", "prediction"])
            writer.writerows([r["id"], r["dialogue"], r["summary"], r["summary"][:40]] for r in rows)
    run_stage("eval_metrics_bart_lora.py", "--predictions=outputs/a_predictions.csv,../shared/b_predictions.csv",
              "--bertscore_model=", "--output_dir=report", root=project)
    out = project / "report"
    summary = json.loads((out / "summary_metrics.json").read_text())
    assert [v["file"] for v in summary["versions"]] == ["outputs/a_predictions.csv", "../shared/b_predictions.csv"]
    for name in ("summary_metrics.csv", "summary_metrics.json", "report.html", "eval_metrics.run_config.json"):
        assert not absolute_paths((out / name).read_text(encoding="utf-8")), name
