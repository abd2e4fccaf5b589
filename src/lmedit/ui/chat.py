"""`lmedit chat`: talk to the (edited) model in the terminal, with commands to apply, revert and probe patches.

The loop reads lines from any text stream and writes to a rich Console, so a test drives it with StringIO. With a
chat template (an instruct model's tokenizer has one) the conversation goes through it; without one, each line is
continued as plain text. Applying or reverting a patch starts the conversation afresh: the earlier replies came
from another model.
"""

from __future__ import annotations

import math

import torch
from rich.console import Console

from lmedit.errors import InputError, LmeditError
from lmedit.evaluate.generation import greedy_continuations
from lmedit.evaluate.scoring import sum_logprob
from lmedit.locate.prompts import encode
from lmedit.patches import Patch
from lmedit.ui.session import PatchStack

HELP = """commands:
  /apply DIR     apply a saved patch directory on top of those applied
  /revert        revert the last applied patch
  /patches       list the applied patches
  /probe PROMPT  the greedy continuation of PROMPT as plain text (no chat template), and P(target | PROMPT)
                 for the targets of the patches applied in this chat (reverted ones too)
  /reset         forget the conversation so far
  /help          this list
  /quit          leave (so does Ctrl-D)"""
PROBE_TOKENS = 12


class ChatLoop:
    """A conversation with `lm` and the stack of patches applied to it."""

    def __init__(self, lm, console: Console, stack: PatchStack | None = None, max_new_tokens: int = 64):
        self.lm, self.console, self.max_new_tokens = lm, console, max_new_tokens
        self.stack = stack if stack is not None else PatchStack(lm.model)
        self.history: list[dict] = []
        self.targets: list[str] = []  # of every patch applied in this chat, reverted or not: a probe shows them all
        for entry in self.stack.entries:
            self._remember(entry.patch)
        self.templated = bool(getattr(lm.tokenizer, "chat_template", None))

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def run(self, stream) -> None:
        """Read lines until /quit or the end of the stream; an lmedit error is one line and the loop goes on."""
        mode = "its chat template" if self.templated else "plain continuation (the tokenizer has no chat template)"
        self.say(f"chatting with {self.lm.name} through {mode}; /help lists the commands")
        prompt = getattr(stream, "isatty", lambda: False)()
        while True:
            if prompt:
                self.console.print("you> ", end="", markup=False)
            line = stream.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        break
                else:
                    self.say("model> " + self.reply(line))
            except LmeditError as e:
                self.say(f"error: {e}")

    # ------------------------------------------------------------------ commands

    def command(self, line: str) -> bool:
        """Run one /command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.history.clear()
            self.say("(the conversation starts afresh)")
        elif name == "/apply":
            if not arg:
                raise InputError("/apply needs a patch directory: /apply DIR")
            entry = self.apply(Patch.load(arg), arg)
            self._changed(f"applied {entry.patch.meta.get('method', 'a')} patch {arg} "
                          f"({entry.patch.num_params} numbers; {len(self.stack.entries)} applied)")
        elif name == "/revert":
            entry = self.stack.pop()
            self._changed(f"reverted {entry.label} ({len(self.stack.entries)} still applied)")
        elif name == "/patches":
            for e in self.stack.entries:
                self.say(f"  {e.id}. {e.label}: {e.patch.meta.get('method')}, {len(e.patch.meta.get('requests', []))} "
                         f"request(s), {e.patch.num_params} numbers")
            if not self.stack.entries:
                self.say("  none: the model is as it was loaded")
        elif name == "/probe":
            if not arg:
                raise InputError("/probe needs a prompt: /probe The Eiffel Tower is located in the city of")
            self.probe(arg)
        else:
            raise InputError(f"unknown command {name}; /help lists them")
        return True

    def apply(self, patch: Patch, label: str):
        """Put `patch` on the model (refused when made on another base) and remember its targets for /probe."""
        entry = self.stack.push(patch, label)
        self._remember(patch)
        return entry

    def _remember(self, patch: Patch) -> None:
        for r in patch.meta.get("requests", []):
            self.targets += [t for t in (r.get("target_new"), r.get("target_true")) if t and t not in self.targets]

    def _changed(self, message: str) -> None:
        self.history.clear()
        self.say(message + "; the conversation starts afresh")

    def probe(self, prompt: str) -> None:
        """The plain-text continuation, and the probability after the prompt of each target of the edits applied
        in this chat (reverted ones too, to see them fall back)."""
        completion = greedy_continuations(self.lm.model, self.lm.tokenizer, [prompt], PROBE_TOKENS)[0]
        self.say(f"  greedy: {prompt}[{completion}]")
        if self.targets:
            logps = sum_logprob(self.lm.model, self.lm.tokenizer, [(prompt, t) for t in self.targets])
            self.say("  " + "   ".join(f"P({t}) = {math.exp(lp):.4g}" for t, lp in zip(self.targets, logps)))

    # ------------------------------------------------------------------ talking

    def _ids(self) -> list[int]:
        """The conversation as token ids, its oldest turns dropped until a reply still fits the context."""
        tok = self.lm.tokenizer
        limit = getattr(self.lm.model.config, "max_position_embeddings", None) or 2048
        while True:
            text = tok.apply_chat_template(self.history, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) + self.max_new_tokens <= limit or len(self.history) <= 1:
                return ids
            del self.history[:2]

    @torch.no_grad()
    def reply(self, text: str) -> str:
        """The model's greedy answer to `text`: the next turn of the conversation, or its plain continuation."""
        tok, model = self.lm.tokenizer, self.lm.model
        if self.templated:
            self.history.append({"role": "user", "content": text})
            ids = self._ids()
        else:
            ids = encode(tok, text)
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        stops = [t for t in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)) if t is not None]
        stops = sorted({s for t in stops for s in (t if isinstance(t, list) else [t])})
        pad = tok.pad_token_id if tok.pad_token_id is not None else (stops or [0])[0]
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=self.max_new_tokens, pad_token_id=pad, eos_token_id=stops or None)
        answer = tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
        if self.templated:
            self.history.append({"role": "assistant", "content": answer})
        return answer
