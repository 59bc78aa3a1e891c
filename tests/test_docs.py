"""The documentation is tested: every shell block of README.md and docs/*.md runs as written.

A fresh project (FTF_ROOT in a temporary folder, the repository's code linked in) gets
data/my_dialogues.csv, 40 dialogues with the columns `conversation` and `notes`. README.md's blocks run
first, in order, in one bash with `set -e`, as a user pastes them into one terminal: the walkthrough
ends with a served summarizer answering a request. Then each page of docs/ runs the same way in that
project (a page starts from the README's outputs, so pages do not depend on each other). The
models the blocks name (SmolLM2, bart-large-cnn) are replaced by tiny models built offline; port
8000 by a free port.

A block marked `<!-- doc-test: skip ... -->` (a GPU, the Hub, a program the project does not install,
minutes of work, an install) does not run, but its flags are checked like every other block's:
each `--NAME` given to a stage must be a setting it declares, so a renamed flag fails here. The
marks are counted and printed; an unknown mark fails.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from doc_blocks import (MARKS, SHELL_LANGS, blocks, doc_files, flag_problems, free_port, inline_commands,
                        make_project, prose_words, run_shell, script_for, shell_env)

README_WORD_LIMIT = 1500


def all_blocks():
    return [b for path in doc_files() for b in blocks(path)]


def test_marks_are_known_and_counted(capsys):
    found = all_blocks()
    unknown = [f"{b.where}: {b.mark!r}" for b in found if b.mark and b.mark not in MARKS]
    assert not unknown, f"unknown doc-test marks (known: {sorted(MARKS)}): {unknown}"
    shell = [b for b in found if b.lang in SHELL_LANGS]
    counts = {mark: sum(b.mark == mark for b in shell) for mark in MARKS}
    line = (f"doc blocks: {sum(b.mark is None for b in shell)} shell blocks run, "
            + ", ".join(f"{n} {mark}" for mark, n in counts.items() if n))
    with capsys.disabled():
        print("\n" + line)
    assert shell and any(b.mark is None for b in shell)
    marked_other = [b.where for b in found if b.mark and b.lang not in SHELL_LANGS]
    assert not marked_other, f"a mark on a block that is not a shell block: {marked_other}"


def test_every_flag_in_the_docs_is_a_setting_of_its_stage():
    """Shell blocks (run or not) and inline `python <stage>.py --NAME=...` spans in the prose."""
    problems = []
    for path in doc_files():
        texts = [(b.where, b.text) for b in blocks(path) if b.lang in SHELL_LANGS]
        texts += [(f"{path.name} (inline)", span) for span in inline_commands(path)]
        problems += flag_problems(texts)
    assert not problems, "\n".join(problems)


def test_every_shell_block_is_valid_bash():
    """Blocks that do not run here are at least parsed (`bash -n`)."""
    import subprocess
    for block in all_blocks():
        if block.lang in SHELL_LANGS:
            result = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
            assert result.returncode == 0, f"{block.where}: {result.stderr.strip()}"


def test_flag_check_catches_a_renamed_flag():
    assert flag_problems([("doc", "python train_bart_lora.py --epochs=1 --learning_rate=1e-3")]) == []
    assert flag_problems([("doc", 'DATA="--dataset=x --text_column=dialogue"\n'
                                  "python train_bart_lora.py $DATA")]) == [
        "doc: train_bart_lora.py has no setting --text_column"]
    assert flag_problems([("doc", "accelerate launch --num_processes 2 eval_bart_lora.py --modle=x")]) == [
        "doc: eval_bart_lora.py has no setting --modle"]
    assert flag_problems([("doc", "bash outputs/benchmarks/train_smollm2.sh --max_step=20")]) == [
        "doc: train_bart_lora.py has no setting --max_step"]


def test_readme_is_short_and_links_resolve():
    readme = doc_files()[0]
    words = prose_words(readme)
    assert words <= README_WORD_LIMIT, f"README.md has {words} words of prose (limit {README_WORD_LIMIT})"
    for path in doc_files():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (path.parent / target).exists(), f"{path.name}: broken link {target}"


@pytest.fixture(scope="module")
def walked(tiny_models, converter, tmp_path_factory):
    """The README walkthrough, run in a fresh project: (root, models, env, output)."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make install-llama)")
    if not shutil.which("curl"):
        pytest.skip("curl is not installed (the serving blocks use it)")
    models = dict(tiny_models)
    root = make_project(tmp_path_factory.mktemp("doc_project"))
    env = shell_env(root, tmp_path_factory.mktemp("doc_bin"))
    readme = doc_files()[0]
    start = time.perf_counter()
    result = run_shell(script_for(blocks(readme), models, free_port()), root, env, timeout=900)
    assert result.returncode == 0, f"README.md's blocks failed:\n{result.stdout[-6000:]}"
    print(f"README walkthrough: {time.perf_counter() - start:.0f} s")
    return root, models, env, result.stdout


@pytest.mark.slow
def test_readme_walkthrough_ends_with_a_served_summary(walked):
    root, _, _, output = walked
    assert "train 28, validation 4, test 8 rows" in output
    for tag in ("zeroshot", "lora", "merged"):
        assert (root / "metrics" / f"{tag}_predictions.csv").is_file()
    assert (root / "metrics" / "report.html").is_file()
    assert (root / "ft_outputs" / "gguf" / "my_summarizer-q8_0.gguf").is_file()
    summary_line = [line for line in output.splitlines() if line.startswith('{"id"') or '"summary"' in line]
    assert summary_line, f"the served summarizer did not answer:\n{output[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p.name for p in doc_files()[1:]])
def test_docs_page_runs(walked, page):
    root, models, env, _ = walked
    path = Path(doc_files()[0].parent / "docs" / page)
    result = run_shell(script_for(blocks(path), models, free_port()), root, env, timeout=600)
    assert result.returncode == 0, f"docs/{page}'s blocks failed:\n{result.stdout[-6000:]}"


def test_marks_are_read_from_the_line_above_a_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- doc-test: skip gpu -->\n```bash\nmake gpu-check\n```\n\n```sh\necho hi\n```\n"
                    "<!-- doc-test: skip lunch -->\n```bash\necho\n```\n")
    found = blocks(page)
    assert [(b.lang, b.mark) for b in found] == [("bash", "skip gpu"), ("sh", None), ("bash", "skip lunch")]
    assert found[2].mark not in MARKS
    page.write_text("<!-- doc-test: skip gpu -->\nprose between the mark and its block\n```bash\nls\n```\n")
    with pytest.raises(AssertionError, match="just above a block"):
        blocks(page)
