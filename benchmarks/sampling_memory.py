"""Memory of a sentence step as K grows: the prompt's KV shared by its rows vs copied per row, in one run.

A tiny random LLaVA-1.5 with the real image geometry (336 px, patch 14: 576 image tokens per
prompt), a late step of the search: --prompts prompts x 3 beams, each beam with a --prefix-token
response so far, K candidates of --max-new-tokens each. "copied" is the engine before sharing
(each row's cache holds its prompt); "shared" (the default) reads each prompt's KV in place.
Each (engine, K) runs in its own process. "peak" is the process's peak resident memory while it
samples (Linux's VmHWM, reset once the model is loaded and the prompts encoded): weights, the
prompts' prefill and KV, and the step; "growth" is that peak less the resident memory before.
Both sides decode the same requests with the same seeds. The target: the peak at K=8 within 20%
of the peak at K=2.

    python benchmarks/sampling_memory.py [--prompts 8] [--prefix-tokens 64] [--max-new-tokens 16] [--hidden 256]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KS = (2, 4, 8)


def _status_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def child(args) -> None:
    import torch
    from PIL import Image

    from csr_plugin.config import ModelConfig, SearchConfig
    from csr_plugin.sampling.engine import Expansion
    from csr_plugin.sampling.transformers_engine import TransformersEngine, load_vlm

    torch.set_num_threads(1)
    model, processor = load_vlm(ModelConfig(path=args.model, dtype="float32", device="cpu"))
    engine = TransformersEngine(model, processor, SearchConfig(max_new_tokens=args.max_new_tokens,
                                                               max_batch_tokens=1 << 30))
    engine.share_prompt = args.engine == "shared"
    words = engine.tokenizer.encode(" a red circle and a blue square beside a green star" * 20,
                                    add_special_tokens=False)[:args.prefix_tokens]
    prompts = [engine.encode_prompt("Describe the image in detail.", Image.new("RGB", (400 + 13 * i, 360),
                                                                               (40 * i % 256, 90, 160)))
               for i in range(args.prompts)]
    requests = [Expansion(p, words[:args.prefix_tokens - b], args.k, seed=10 * i + b)
                for i, p in enumerate(prompts) for b in range(3)]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)   # hand freed heap back, so the baseline is what is held
    Path("/proc/self/clear_refs").write_text("5")   # reset the peak (VmHWM) to the current resident size
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    out = engine.expand(requests)   # the prompts' prefill and KV (held once by either engine), then the step
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(json.dumps({"growth_mib": (peak - before) / 1024, "peak_mib": peak / 1024,
                      "kv_mib": engine.kv_tokens(requests) * engine.kv_bytes_per_token / 2**20,
                      "ms_per_prompt": seconds / len(prompts) * 1000, "prompt_tokens": len(prompts[0].token_ids),
                      "tokens": [[c.token_ids for c in cs] for cs in out]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256, help="LM width of the tiny model (KV per token)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from csr_plugin.toy.tiny_families import build_tiny_llava_geometry

    model = build_tiny_llava_geometry(Path(tempfile.mkdtemp(prefix="csr-kv-")) / "vlm", hidden=args.hidden)
    rows = {}
    for k in KS:
        for engine in ("copied", "shared"):
            done = subprocess.run([sys.executable, __file__, "--child", "--engine", engine, "--k", str(k),
                                   "--model", str(model), "--prompts", str(args.prompts), "--prefix-tokens",
                                   str(args.prefix_tokens), "--max-new-tokens", str(args.max_new_tokens)],
                                  capture_output=True, text=True, check=True)
            rows[engine, k] = json.loads(done.stdout.strip().splitlines()[-1])
    prompt = rows["shared", KS[0]]["prompt_tokens"]
    print(f"tiny LLaVA-1.5 geometry (hidden {args.hidden}), {args.prompts} prompts of {prompt} tokens (576 image) x 3 "
          f"beams, prefix {args.prefix_tokens} tokens, {args.max_new_tokens} new tokens, 1 CPU thread, one process "
          "per row")
    print(f"{'K':>2} {'rows':>5} | {'copied: KV':>10} {'peak':>7} {'growth':>7} {'ms/prompt':>9} | "
          f"{'shared: KV':>10} {'peak':>7} {'growth':>7} {'ms/prompt':>9} | same tokens   (MiB)")
    for k in KS:
        c, s = rows["copied", k], rows["shared", k]
        print(f"{k:>2} {args.prompts * 3 * k:>5} | {c['kv_mib']:>10.1f} {c['peak_mib']:>7.0f} {c['growth_mib']:>7.1f} "
              f"{c['ms_per_prompt']:>9.1f} | {s['kv_mib']:>10.1f} {s['peak_mib']:>7.0f} {s['growth_mib']:>7.1f} "
              f"{s['ms_per_prompt']:>9.1f} | {c['tokens'] == s['tokens']}")
    for engine in ("copied", "shared"):
        low, high = rows[engine, KS[0]], rows[engine, KS[-1]]
        print(f"{engine}: K={KS[0]} -> K={KS[-1]}: peak {low['peak_mib']:.0f} -> {high['peak_mib']:.0f} MiB "
              f"(+{(high['peak_mib'] - low['peak_mib']) / low['peak_mib'] * 100:.0f}% of the K={KS[0]} figure), "
              f"growth {low['growth_mib']:.0f} -> {high['growth_mib']:.0f} MiB")
    print(f"shared / copied at K={KS[-1]}: peak {rows['shared', KS[-1]]['peak_mib'] / rows['copied', KS[-1]]['peak_mib']:.2f}, "
          f"growth {rows['shared', KS[-1]]['growth_mib'] / rows['copied', KS[-1]]['growth_mib']:.2f}")


if __name__ == "__main__":
    main()
