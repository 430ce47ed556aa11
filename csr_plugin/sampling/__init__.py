"""Sampling: prompts -> search trees, one place for every way CSR samples.

- prompts.py: prompt records and the checks made before any search;
- engine.py: what an engine offers the search (encoded prompts, continuations);
  transformers_engine.py and vllm_engine.py implement it; sentence_end.py is the
  sentence-boundary rule both share;
- search.py: the sentence-level beam search and its tree;
- local.py: `csr sample` on this process (resumable trees.jsonl / errors.jsonl);
- ray_driver.py: `csr sample --ray`, the same search sharded over Ray actors, either
  ours (ray_actors.py) or OpenRLHF's vLLM rollout actors running our agent (openrlhf_actors.py).
"""
