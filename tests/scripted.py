"""A scripted backend for tests that need a known summary (the checks, the page's highlight): the
tiny Llama's tokenizer and prompts, a backend whose every row "generates" the token ids of a fixed
summary one step at a time through the engine's on_step (so it streams like a real one)."""
from __future__ import annotations

from dataclasses import replace

from finetuneflow.model.backends import Backend, Capabilities, Generated

INVENTED = "Tom and Ben discuss the budget review tomorrow at 10."       # "Ben" is not in DIALOGUE
DIALOGUE = ("#Person1#: Hi Tom, are we still on for the budget review tomorrow at 10?\n"
            "#Person2#: Yes. I will bring the numbers for the second quarter.\n"
            "#Person1#: Great, see you then.")


class Scripted(Backend):
    name = "scripted"
    capabilities = Capabilities(token_streaming=True)

    def __init__(self, summary: str = INVENTED):
        self.summary = summary

    def detect(self, path) -> bool:
        return False

    def generate_batch(self, loaded, batch, decoding, on_step=None):
        ids = loaded.tokenizer.encode(self.summary, add_special_tokens=False)
        out = []
        for row in range(len(batch)):
            taken = []
            for token in ids:
                taken.append(token)
                if on_step is not None and on_step(row, token):
                    break
            out.append(Generated(taken, len(taken) + 1, "stop"))
        return out

    def token_log_probs(self, loaded, prompt_ids, target_ids):
        return [0.0] * len(target_ids)


def scripted_model(tiny_llama, summary: str = INVENTED):
    """The tiny Llama with the scripted backend (its tokenizer, prompts and limits)."""
    from finetuneflow.model.loading import load_model
    loaded = load_model(str(tiny_llama), device="cpu")
    backend = Scripted(summary)
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(summary, add_special_tokens=False)) == summary
    return replace(loaded, backend=backend, name="scripted")
