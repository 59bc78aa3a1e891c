"""Ollama, llama.cpp and LM Studio: the Modelfile and the usage note written beside a GGUF export.

The Modelfile's TEMPLATE reproduces the prompt of model/prompts.py around Ollama's `.Prompt`: the
chat template is rendered with placeholders and the text around them becomes Go-template text,
so the prompt Ollama sends is byte-identical to the one the model was trained and evaluated with
(including a default system prompt the template adds by itself). Decoding is greedy, as evaluated.
"""
from __future__ import annotations

from finetuneflow.contract.decoding import GenerationSettings
from finetuneflow.model.family import CAUSAL, SEQ2SEQ


def _go_literal(text: str) -> str:
    """Template text with Go-template delimiters escaped."""
    return text.replace("{{", '{{ "{{" }}')


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def ollama_template(tokenizer, instruction: str) -> tuple[str, list[str]]:
    """(TEMPLATE, stop strings) reproducing the prompt of prompts.py around Ollama's .Prompt.

    The chat template is rendered with placeholders; the text around them becomes Go-template
    text, so the Ollama prompt is byte-identical to the one the model was trained and evaluated
    with (including a default system prompt the template adds by itself)."""
    from finetuneflow.model.prompts import PLAIN_TEMPLATE, prompt_style, stop_token_ids
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    if prompt_style(tokenizer) != "chat_template":
        before, after = PLAIN_TEMPLATE.format(instruction=instruction, dialogue="\x00").split("\x00")
        return _go_literal(before) + "{{ .Prompt }}" + _go_literal(after) + "{{ .Response }}", stops
    prompt, system, response = "\u2063PROMPT\u2063", "\u2063SYSTEM\u2063", "\u2063RESPONSE\u2063"
    user = {"role": "user", "content": f"{instruction}\n\n{prompt}"}

    def render(messages, gen):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)

    before_user, after_user = render([user], True).split(prompt)
    try:
        with_system = render([{"role": "system", "content": system}, user], True).split(prompt)[0]
    except Exception:   # templates that reject a system message
        with_system = ""
    if system in with_system:
        common = _common_suffix(before_user, with_system)
        default = before_user[:len(before_user) - len(common)]
        system_block = _go_literal(with_system[:len(with_system) - len(common)]).replace(system, "{{ .System }}")
        head = ("{{ if .System }}" + system_block + ("{{ else }}" + _go_literal(default) if default else "")
                + "{{ end }}" + _go_literal(common))
    else:
        head = _go_literal(before_user)
    full = render([user, {"role": "assistant", "content": response}], False)
    end_of_turn = full.split(response, 1)[1] if response in full else ""
    template = head + "{{ .Prompt }}" + _go_literal(after_user) \
        + "{{ .Response }}" + _go_literal(end_of_turn)
    marker = end_of_turn.strip()
    if marker and marker not in stops and marker in tokenizer.get_vocab():
        stops.insert(0, marker)
    return template, stops


def modelfile_text(gguf_name: str, tokenizer, instruction: str, generation: dict, num_ctx: int) -> str:
    template, stops = ollama_template(tokenizer, instruction)
    max_new = CAUSAL.resolve_generation(None, GenerationSettings.from_record(generation)).max_new   # GGUF: causal
    stem = gguf_name.removesuffix(".gguf")
    lines = [f"# Ollama Modelfile written by export_gguf.py: ollama create <name> -f {stem}.Modelfile",
             "# The prompt wraps your message (the dialogue) in the instruction and chat template the model",
             "# was fine-tuned and evaluated with. Decoding is greedy, as evaluated.",
             f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0", "PARAMETER top_k 1", "PARAMETER repeat_penalty 1",
              f"PARAMETER num_predict {max_new}", f"PARAMETER num_ctx {num_ctx}"]
    if (generation.get("num_beams") or 1) > 1:
        lines.append(f"# evaluated with num_beams={generation['num_beams']}; Ollama has no beam search (greedy here)")
    if generation.get("no_repeat_ngram_size"):
        lines.append(f"# evaluated with no_repeat_ngram_size={generation['no_repeat_ngram_size']}; Ollama has no "
                     f"equivalent")
    return "\n".join(lines) + "\n"


def usage_text(gguf_name: str, stem: str, family: str, instruction: str) -> str:
    prompt_note = (f"Ollama's Modelfile adds the instruction (\"{instruction}\") and the chat template; "
                   f"with llama.cpp and LM Studio, send the same user message: the instruction, a blank line, "
                   f"then the dialogue.")
    if family == SEQ2SEQ:
        return (f"# {gguf_name}\n\nA T5-architecture GGUF. llama.cpp runs it with `llama-cli -m {gguf_name} -p "
                f"\"<input text>\"`; Ollama and LM Studio do not run encoder-decoder GGUF files.\n")
    return f"""# {gguf_name}

Written by `export_gguf.py` (llama.cpp's converter); chat template and tokenizer are embedded.
{prompt_note}

## llama.cpp
    llama-cli -m {gguf_name} -cnv --temp 0 --repeat-penalty 1     # chat in the terminal
    llama-server -m {gguf_name} --port 8080                      # OpenAI-compatible HTTP API

## LM Studio
    lms import {gguf_name}      # or copy the file under ~/.lmstudio/models/<publisher>/<model>/
Then load it, set temperature 0, and paste the instruction and a dialogue as the user message.

## Ollama
    ollama create {stem} -f {stem}.Modelfile
    ollama run {stem} "Anna: Lunch at noon? Ben: Sure, see you at the cafe."
"""
