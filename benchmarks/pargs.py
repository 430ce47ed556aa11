"""PARGS reward-guided decoding: time per generated token against plain sampling, in one run.

(a) plain sampling: one prefill, then one KV-cached policy decode step per token for all rows
    (Gumbel-max over the full vocabulary, the transformers engine's sampler);
(b) guided_decode: (a) plus, per token, one reward-model decode step for rows x k candidates on the
    rows' prefix caches: the k candidates as k query tokens of one step, kept apart by a 4D mask
    (sharing="mask", the default); (b') the same with the prefix cache repeated k-fold and the
    candidates as rows x k single-token rows (sharing="expand");
(c) guided_decode_naive: per row and token one full policy forward and one full reward-model forward
    per candidate, no caches (the reference implementation's cost).
A tiny random LLaVA (CLIP tower, LLaMA decoder) as policy and a second one with a scalar head as the
reward model, the same prompts and seeds for all three; EOS is not a stop here, so every row makes
exactly --new-tokens tokens. Each method runs --repeats times, interleaved; the median counts.

    python benchmarks/pargs.py [--rows 8] [--new-tokens 32] [--k 10] [--hidden 256] [--layers 4] [--repeats 3]
    python benchmarks/pargs.py --llava-geometry      # 589-token prompts (576 image tokens)
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from csr_plugin.multimodal import batch_inputs, chat_prompt, encode_prompt
from csr_plugin.sampling.pargs_decoding import (DecodeSetup, PargsSettings, guided_decode, guided_decode_naive,
                                            setup_for)
from csr_plugin.reward_model.model import MultimodalRewardModel
from csr_plugin.sampling.transformers_engine import counter_gumbel
from csr_plugin.toy.tiny_models import build_tiny_vlm

QUESTIONS = ["Describe the image in detail.", "What objects are in the picture?", "Is there a cat?",
             "Describe the image.", "The picture shows two shapes!", "A blue square sits on the left."]


@torch.inference_mode()
def plain_sampling(policy, prompts, images, seeds, new_tokens: int, setup: DecodeSetup) -> list[list[int]]:
    kwargs = batch_inputs(policy.config, prompts, images, setup.pad_id, "left")
    kwargs["position_ids"] = (kwargs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    out = policy(**kwargs, use_cache=True, logits_to_keep=1)
    cache, logits, attention = out.past_key_values, out.logits[:, -1], kwargs["attention_mask"]
    next_pos = torch.tensor([len(p) for p in prompts])
    row_seeds = torch.tensor(seeds, dtype=torch.long)
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool)
    banned[list(setup.banned_ids)] = True
    tokens = []
    for step in range(new_tokens):
        token = (logits.float().log_softmax(-1).masked_fill(banned, float("-inf"))
                 + counter_gumbel(row_seeds, step, logits.shape[-1])).argmax(-1)
        tokens.append(token)
        if step == new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], 1)
        out = policy(input_ids=token[:, None], attention_mask=attention, past_key_values=cache,
                     position_ids=next_pos[:, None], use_cache=True)
        cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    return torch.stack(tokens, 1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-repeats", type=int, default=1, help="(c) is slow: it runs this often")
    parser.add_argument("--llava-geometry", action="store_true",
                        help="LLaVA-1.5's image geometry (336 px, 576 image tokens) on a tiny LM of width 128 "
                             "instead of --hidden / --layers: long prompts, as in real use")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="csr-pargs-"))
    if args.llava_geometry:
        from csr_plugin.toy.tiny_families import build_tiny_llava_geometry
        path = build_tiny_llava_geometry(root / "vlm")
    else:
        path = build_tiny_vlm(root / "vlm", hidden=args.hidden, layers=args.layers)
    text = AutoConfig.from_pretrained(path).get_text_config()
    policy = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    torch.manual_seed(1)
    reward_model = MultimodalRewardModel(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32),
                                         "linear").eval()
    setup = setup_for(processor, policy)
    setup = DecodeSetup(eos_ids={-1}, pad_id=setup.pad_id, banned_ids=setup.banned_ids)   # fixed lengths
    pictures = [Image.new("RGB", (400 + 13 * i, 360), (30 * i % 256, 200 - 15 * i, 90)) for i in range(args.rows)]
    encoded = [encode_prompt(processor, chat_prompt(processor, QUESTIONS[i % len(QUESTIONS)]), pictures[i])
               for i in range(args.rows)]
    prompts, images = [e[0] for e in encoded], [e[1] for e in encoded]
    seeds = list(range(args.rows))
    settings = PargsSettings(top_k=args.k, weight=2.0, greedy=False, max_new_tokens=args.new_tokens)
    runs = {
        "plain": lambda: plain_sampling(policy, prompts, images, seeds, args.new_tokens, setup),
        "guided": lambda: guided_decode(policy, reward_model, prompts, images, seeds, settings, setup),
        "expand": lambda: guided_decode(policy, reward_model, prompts, images, seeds, settings, setup,
                                        sharing="expand"),
        "naive": lambda: guided_decode_naive(policy, reward_model, prompts, images, seeds, settings, setup),
    }
    times = {name: [] for name in runs}
    outputs = {}
    for repeat in range(args.repeats):   # interleaved, so drift in machine load hits every method alike
        for name, run in runs.items():
            if name == "naive" and repeat >= args.naive_repeats:
                continue
            start = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - start)
    total = args.rows * args.new_tokens
    assert all(len(row) == args.new_tokens for out in outputs.values() for row in out)
    per_token = {name: statistics.median(t) / total * 1000 for name, t in times.items()}
    params = sum(p.numel() for p in policy.parameters()) / 1e6
    print(f"tiny LLaVA policy + reward model ({params:.2f}M params each, hidden {text.hidden_size}, "
          f"{text.num_hidden_layers} layers), "
          f"{args.rows} rows, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{args.new_tokens} new tokens each, k={args.k}, {torch.get_num_threads()} CPU threads, median of "
          f"{args.repeats} (naive: {args.naive_repeats})")
    for name, label in (("plain", "(a) plain sampling       "), ("guided", "(b) PARGS, shared by mask"),
                        ("expand", "(b') PARGS, cache x k    "), ("naive", "(c) PARGS naive          ")):
        print(f"{label}: {per_token[name]:8.2f} ms/token  (runs: {', '.join(f'{t:.2f}s' for t in times[name])})")
    print(f"b/a = {per_token['guided'] / per_token['plain']:.2f}   "
          f"b'/a = {per_token['expand'] / per_token['plain']:.2f}"
          f"   c/a = {per_token['naive'] / per_token['plain']:.2f}"
          f"   c/b = {per_token['naive'] / per_token['guided']:.1f}   (b and c same tokens: "
          f"{outputs['guided'] == outputs['naive'] == outputs['expand']})")


if __name__ == "__main__":
    main()
