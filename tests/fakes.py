"""A scripted engine and CLIP with known scores, to pin the search's bookkeeping exactly."""
from __future__ import annotations

import random

from csr_plugin.sampling.engine import Continuation, EncodedPrompt


class ScriptedEngine:
    """Candidate k of node path P is the sentence ' P.k.' with a log-prob drawn from the path.

    ``eos_at`` maps a depth to candidate indices that end with EOS; ``blank_eos_at``
    to indices that are EOS alone; ``texts`` and ``logprobs`` fix a (depth, index)'s text and log-prob.
    """
    max_context = 10_000

    def __init__(self, eos_at=None, blank_eos_at=None, texts=None, logprobs=None):
        self.eos_at = eos_at or {}
        self.blank_eos_at = blank_eos_at or {}
        self.texts = texts or {}
        self.logprobs = logprobs or {}
        self.calls = []

    def encode_prompt(self, question, image):
        return EncodedPrompt(token_ids=[1, 2, 3], image_inputs={"question": question})

    def expand(self, requests):
        self.calls.append(len(requests))
        out = []
        for r in requests:
            depth = len(r.prefix_ids) + 1
            conts = []
            for k in range(r.n):
                rng = random.Random(f"{r.prompt.image_inputs['question']}|{r.prefix_ids}|{k}")
                lp = [self.logprobs.get((depth, k), -rng.uniform(0.1, 3.0))]
                if k in self.blank_eos_at.get(depth, ()):
                    conts.append(Continuation([0], lp, "", "eos"))
                    continue
                token = 100 * depth + k
                text = self.texts.get((depth, k), f" sentence {depth} {k} {rng.randint(0, 99)}.")
                finish = "eos" if k in self.eos_at.get(depth, ()) else "sentence"
                conts.append(Continuation([token], lp, text, finish))
            out.append(conts)
        return out


class ScriptedClip:
    """R_I drawn from the sentence text; ``anti`` makes it fall as the engine's log-prob rises."""

    def __init__(self):
        self.batches = []

    def score(self, items):
        self.batches.append(len(items))
        return [random.Random(text).uniform(0.0, 40.0) for _, _, text in items]
