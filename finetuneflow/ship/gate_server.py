"""The deploy gate's llama-server step: the summaries users get from the server they run.

For each GGUF the gate (ship/deploy_gate.py) starts llama.cpp's own `llama-server`
(ship/llama_server.py) with the GGUF's own chat template and the generated Modelfile's parameters
(temperature 0, top_k 1, repeat_penalty 1, its stop strings, `num_predict`), the same threads as the
in-process runs, and sends every held-out row as a user would: one user message, the instruction,
a blank line, then the whole dialogue, to `/v1/chat/completions`. It reports

* the share of summaries identical to the in-process llama.cpp backend's on the same file, decoded
  as the Modelfile says (`Decoding.served`: greedy; a server has no `no_repeat_ngram_size` or
  `min_new_tokens`, so when the evaluation used them the in-process side runs again without them);
* the ROUGE-L of the server's own texts against the references, and how many hit `num_predict`;
* batch-order noise, measured: each row whose server text differs is decoded in-process again
  alone (batch size 1); where that text differs from the batched one, the in-process run itself
  depends on its batch, so the row is noise. Any other differing row is beyond noise, and the first
  one is shown (the criterion in ship/gate_verdict.py holds the artifact).

Texts are compared as they are, except a trailing U+FFFD: a summary cut by the token limit inside
a multi-byte character ends in one in-process (transformers decodes the partial bytes), while the
server holds incomplete bytes back. Rows whose dialogue the in-process run had to cut (longer than
MAX_INPUT_LENGTH) or split in windows are not compared: the server reads the whole dialogue. A
missing `llama-server` skips the step with one line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetuneflow.ship.llama_tools import find_tool, missing

CTX_STEP = 256
SHOWN_CHARS = 160


@dataclass
class ServerPlan:
    """What the step needs from the in-process side, gathered while the model is loaded."""
    texts: list[str]                 # in-process summaries, decoded as the Modelfile says, batched
    excluded: list[int]              # rows not compared (cut or windowed in-process)
    ctx_size: int                    # the server's context: the longest whole prompt + num_predict
    threads: int
    how: str                         # which in-process run the texts are
    args: tuple[str, ...] = ()       # extra server flags (an f32 file: an f32 KV cache, as in-process)


def modelfile_parameters(modelfile: str | None, max_new: int) -> dict:
    """num_predict, stop strings and temperature as the generated Modelfile says (defaults: the gate's)."""
    from finetuneflow.ship.gguf_audit import parse_modelfile
    parsed = parse_modelfile(modelfile) if modelfile else {"stop": [], "parameters": {}}
    params = parsed["parameters"]
    return {"num_predict": int(params.get("num_predict", max_new)), "stop": list(parsed["stop"]),
            "temperature": float(params.get("temperature", 0))}


def user_message(instruction: str, dialogue: str) -> list[dict]:
    """The user turn model/prompts.py puts in the chat template, as a client sends it."""
    return [{"role": "user", "content": f"{instruction}\n\n{dialogue}"}]


def skip_reason(loaded) -> str | None:
    """Why the server step cannot run on this GGUF (None: it can)."""
    from finetuneflow.model.prompts import prompt_style
    if find_tool("llama-server") is None:
        return missing("llama-server")
    if prompt_style(loaded.tokenizer) != "chat_template":
        return "the GGUF has no chat template: its chat endpoint would apply a default one, not the model's prompt"
    return None


def context_size(loaded, rows: list[dict], instruction: str, num_predict: int) -> int:
    """Cells for the longest whole prompt (no cut) plus the new tokens, within the model's context."""
    from finetuneflow.engine.generation import encode
    longest = max(len(encode(loaded, r["dialogue"], instruction, 10 ** 9)[0]) for r in rows)
    cells = -(-(longest + num_predict + 16) // CTX_STEP) * CTX_STEP
    return min(cells, int(loaded.model.n_ctx_train))


def server_texts(gguf: Path, rows: list[dict], instruction: str, params: dict, plan: ServerPlan,
                 port: int | None, extra_args: tuple[str, ...], log, shown: str | None = None
                 ) -> tuple[list[str], list[str], str]:
    """(texts, finish reasons, how) from llama-server, started and always stopped here."""
    from finetuneflow.ship.llama_server import LlamaServer, sigterm_as_interrupt
    program = find_tool("llama-server")
    texts, reasons = [], []
    with sigterm_as_interrupt(), LlamaServer(program, gguf, threads=plan.threads, ctx_size=plan.ctx_size,
                                             n_predict=params["num_predict"], port=port, args=extra_args) as server:
        log(f"deploy gate: llama-server on {shown or gguf.name} ({server.url}, {plan.threads} threads, context "
            f"{plan.ctx_size}) summarizes {len(rows)} rows")
        for row in rows:
            text, reason = server.chat(user_message(instruction, row["dialogue"]), max_tokens=params["num_predict"],
                                       stop=params["stop"])
            texts.append(text.strip())
            reasons.append(reason)
    how = (f"{program.parent.parent.name} llama-server, --jinja (the GGUF's chat template), 1 slot, temperature "
           f"{params['temperature']:g}, top_k 1, stop {params['stop']}, num_predict {params['num_predict']}")
    return texts, reasons, how


def differs(in_process: str, served: str) -> bool:
    """Whether two summaries differ (beyond a partial character at the token limit, see the docstring)."""
    return in_process.rstrip("\ufffd").rstrip() != served.rstrip("\ufffd").rstrip()


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def compare(rows: list[dict], in_process: list[str], served: list[str], excluded: list[int],
            alone: dict[int, str]) -> dict:
    """Identical share over the compared rows; differing rows split into batch noise (the in-process
    text alone differs from the batched one) and the rest."""
    compared = [i for i in range(len(rows)) if i not in set(excluded)]
    differing = [i for i in compared if differs(in_process[i], served[i])]
    noise = [i for i in differing if i in alone and differs(in_process[i], alone[i])]
    beyond = [i for i in differing if i not in noise]
    out = {"compared": len(compared), "identical": len(compared) - len(differing),
           "identical_share": round(1 - len(differing) / len(compared), 4) if compared else None,
           "differing": [rows[i]["id"] for i in differing], "noise": [rows[i]["id"] for i in noise],
           "beyond_noise": [rows[i]["id"] for i in beyond],
           "alone_equals_server": sum(i in alone and not differs(alone[i], served[i]) for i in differing),
           "excluded": [rows[i]["id"] for i in excluded]}
    if differing:
        first = (beyond or differing)[0]
        out["first_difference"] = {"id": rows[first]["id"], "in_process": _shown(in_process[first]),
                                   "in_process_alone": _shown(alone.get(first, "")), "server": _shown(served[first])}
    return out


def server_lines(label: str, server: dict) -> list[str]:
    """What the console shows for one artifact's server step."""
    if "skipped" in server:
        return [f"  {label}: llama-server step skipped: {server['skipped']}"]
    if "failed" in server:
        return [f"  {label}: HOLD: {server['failed']}"]
    lines = [f"  {label}: llama-server identical to in-process on {server['identical']}/{server['compared']} rows "
             f"(ROUGE-L {server['rougeL']:.2f}; {len(server['noise'])} differing row(s) are batch noise)"]
    if server["beyond_noise"]:
        first = server["first_difference"]
        lines += [f"  {label}: HOLD: llama-server differs beyond batch noise on {len(server['beyond_noise'])} row(s); "
                  f"first, row {first['id']}:",
                  f"    in-process:   {first['in_process']!r}", f"    llama-server: {first['server']!r}"]
    return lines
