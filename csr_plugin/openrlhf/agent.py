"""CSR in OpenRLHF's rollout workers: ``--train.agent_func_path /path/to/csr_plugin/openrlhf/agent.py``.

OpenRLHF 0.11 loads this file with ``spec_from_file_location`` in every vLLM
engine actor, builds ``AgentExecutor()`` once per actor, and awaits
``execute(prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine,
images)`` ``n_samples_per_prompt`` times per prompt, concurrently.

Each call runs the sentence-level beam search (``recipe.search``) against the
engine it is given: the search runs in a worker thread, and every step's
candidate expansions are submitted to the actor's event loop at once, so vLLM
batches them and its prefix cache shares the prompt, the image and each
response prefix across candidates and steps. Per-step sampling parameters
are OpenRLHF's (temperature, top_p, top_k) with ``n`` = search.candidates
returned all at once (``output_kind=FINAL_ONLY``: ``RolloutRayActor.generate``
keeps only vLLM's last streamed output), sentence-end stop tokens, the search's token budget, a per-request seed and
``logprobs=0`` (R_T needs the sampled tokens' log-probs). The visual term (CLIP, or
the reward model of ``reward.source: mrm``, which reads OpenRLHF's templated prompt)
loads once per worker process and is shared by all concurrent calls.

With ``search.candidates: 1`` and ``beam_width: 1`` there is no search: the whole response
is one plain request (OpenRLHF's sampling params, no sentence stop tokens), cut into
sentences and scored afterwards, every generated token kept (plain_rollout.py).

The returned dict is OpenRLHF's trajectory for PPO: the best complete response of the
tree (the only one on the plain path), its reward, the calibrated reward of each sentence
under ``csr_sentence_rewards`` ([[end, reward], ...], ``end`` one past the sentence in
``observation_tokens``) for the step-wise PPO patch (``dense_rewards.py``, which centres
them on the prompt group's mean; ignored by OpenRLHF otherwise), and the tree under
``csr_tree`` for CSR data generation (a one-path tree on the plain path). The reward is
the sum of the sentence rewards with ``ppo.dense_rewards`` (the patch then centres it),
else the mean or the sum as ``curation.length_normalize`` says.

Labels may be JSON ``{"id", "image", "question", "deterministic"}`` (all optional; a plain
image path works too): ``id`` and ``question`` name the tree, ``deterministic`` seeds the
search by the id alone (data generation) instead of afresh per call (PPO).

The recipe comes from ``CSR_RECIPE`` / ``CSR_RECIPE_OVERRIDES`` (env_recipe.py).
"""
from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

from openrlhf.utils.agent import AgentExecutorBase

from csr_plugin.config import Recipe
from csr_plugin.multimodal import control_token_ids
from csr_plugin.openrlhf.env_recipe import recipe_from_env
from csr_plugin.openrlhf.per_process import shared
from csr_plugin.openrlhf.plain_rollout import is_plain, plain_params, response_tree
from csr_plugin.openrlhf.response_reward import image_from_label
from csr_plugin.sampling.engine import Continuation, EncodedPrompt, Expansion, never_sampled_ids
from csr_plugin.sampling.search import Node, PromptJob, SearchTree, SentenceBeamSearch, path_score, root_path
from csr_plugin.sampling.vllm_engine import VllmSentenceRules

# Searches mostly wait on the event loop for vLLM, so one thread each is cheap; asyncio's default pool
# (min(32, CPUs + 4) threads) would cap how many prompts an engine searches, and vLLM batches, at once.
SEARCH_THREADS = 512


def _rules_for(processor, recipe: Recipe) -> VllmSentenceRules:
    tokenizer = getattr(processor, "tokenizer", processor)
    key = ("rules", getattr(tokenizer, "name_or_path", ""), len(tokenizer), tuple(recipe.search.delimiters))

    def build():
        eos = tokenizer.eos_token_id
        eos_ids = set(eos) if isinstance(eos, (list, tuple, set)) else {eos}
        if None in eos_ids:
            raise ValueError("the tokenizer OpenRLHF passed defines no EOS token; set eos_token in its config.")
        from transformers import AutoConfig

        # the model's own config names the control tokens the processor may not (Qwen's vision start/end)
        config = AutoConfig.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
        return VllmSentenceRules(tokenizer, recipe.search, eos_ids,
                                 never_sampled_ids(tokenizer, eos_ids, control_token_ids(config, processor),
                                                   len(tokenizer)))

    return shared(key, build)


class _AsyncEngine:
    """The search's engine contract over OpenRLHF's ``await llm_engine.generate(...)``.

    ``expand`` runs in the search thread; it submits every request of a step to the
    actor's event loop before waiting for any, so they are generated together.
    """

    def __init__(self, llm_engine, loop: asyncio.AbstractEventLoop, rules: VllmSentenceRules, base_params,
                 max_context: int):
        self.llm_engine = llm_engine
        self.loop = loop
        self.rules = rules
        self.base_params = base_params
        self.max_context = max_context
        # prefix -> (token ids, log-probs) of an EOS-only continuation: the search drops it (it adds no
        # sentence) and marks the prefix complete; the trajectory still needs that EOS token.
        self.eos_tails: dict[tuple[int, ...], tuple[list[int], list[float]]] = {}

    def expand(self, requests: Sequence[Expansion]) -> list[list[Continuation]]:
        futures = [asyncio.run_coroutine_threadsafe(
            self.llm_engine.generate(r.prompt.token_ids + r.prefix_ids,
                                     self.rules.sampling_params(r, base=self.base_params),
                                     multi_modal_data=r.prompt.image_inputs), self.loop)
            for r in requests]
        results = []
        for request, future in zip(requests, futures):
            continuations = self.rules.continuations(future.result(), request.prefix_ids)
            for c in continuations:
                if c.eos_only:
                    self.eos_tails.setdefault(tuple(request.prefix_ids), (c.token_ids, c.logprobs))
            results.append(continuations)
        return results


def _label_fields(label) -> dict:
    if isinstance(label, dict):
        return label
    if isinstance(label, str) and label.lstrip().startswith("{"):
        try:
            return json.loads(label)
        except json.JSONDecodeError:
            return {}
    return {}


def _path(tree: SearchTree, node: Node) -> list[Node]:
    return root_path({n.id: n for n in tree.nodes}, node, lambda n: n.parent)


class AgentExecutor(AgentExecutorBase):
    def __init__(self, recipe: Optional[Recipe] = None):
        # OpenRLHF constructs the executor without arguments; tests may pass a recipe.
        self.recipe = recipe or recipe_from_env()
        # The visual term (CLIP or reward.mrm) loads once per worker process, shared by all concurrent calls;
        # its caches are not thread-safe, hence SerialVisual.
        key = ("visual", repr(self.recipe.clip), repr(self.recipe.reward))
        self.clip = shared(key, lambda: _serial(_build_visual(self.recipe)))

    async def execute(self, prompt, label, sampling_params, max_length: int, hf_tokenizer, llm_engine, images=None):
        recipe = self.recipe
        prompt_ids, mm_train_inputs, pil_images, image_key = self._encode(prompt, label, images, hf_tokenizer)
        if len(prompt_ids) + recipe.search.max_new_tokens > max_length:
            raise ValueError(f"prompt is {len(prompt_ids)} tokens; with search.max_new_tokens="
                             f"{recipe.search.max_new_tokens} it exceeds max_length={max_length}. Raise "
                             "--data.max_len / --rollout.max_new_tokens or shorten the prompt.")
        rules = _rules_for(hf_tokenizer, recipe)
        fields = _label_fields(label)
        tree_id = str(fields.get("id") or uuid.uuid4().hex)
        # A fresh nonce per call: OpenRLHF calls us n_samples_per_prompt times for one prompt, and each
        # call must draw its own trajectory. Data generation (`csr sample --ray` on OpenRLHF's engines)
        # asks for "deterministic": the tree then depends on search.seed and the id only, as in `csr sample`.
        seed_key = tree_id if fields.get("deterministic") else f"{tree_id}#{uuid.uuid4().hex}"
        job = PromptJob(id=seed_key, image=image_key, question=str(fields.get("question") or prompt),
                        image_data=pil_images[0], encoded=EncodedPrompt(prompt_ids, {"image": pil_images}),
                        prompt_text=prompt)
        pool = shared("search-threads", lambda: ThreadPoolExecutor(SEARCH_THREADS, thread_name_prefix="csr-search"))
        loop = asyncio.get_running_loop()
        if is_plain(recipe):
            tree, tail = await self._plain(job, sampling_params, seed_key, max_length, llm_engine, rules, pool)
            eos_tails = {}
        else:
            engine = _AsyncEngine(llm_engine, loop, rules, sampling_params, max_context=max_length)
            search = SentenceBeamSearch(engine, self.clip, recipe.search, recipe.reward, recipe.curation)
            tree = (await loop.run_in_executor(pool, search.run, [job]))[0]
            tail, eos_tails = None, engine.eos_tails
        tree.id = tree_id
        return self._response(prompt, label, images, mm_train_inputs, prompt_ids, tree, rules.eos_ids, eos_tails,
                              tail, with_logprobs=getattr(sampling_params, "logprobs", None) is not None)

    async def _plain(self, job: PromptJob, sampling_params, seed_key: str, max_length: int, llm_engine,
                     rules: VllmSentenceRules, pool) -> tuple[SearchTree, tuple[list[int], list[float]]]:
        """One vLLM request for the whole response, split and scored afterwards (plain_rollout.py);
        returns the one-path tree and the generated tokens no sentence covers (all of a response
        without a word, else none)."""
        search = self.recipe.search
        budget = min(search.max_new_tokens * search.max_sentences, max_length - len(job.encoded.token_ids))
        params = plain_params(sampling_params, self.recipe, seed_key, budget, rules.banned_ids)
        request = await llm_engine.generate(job.encoded.token_ids, params, multi_modal_data=job.encoded.image_inputs)
        output = request.outputs[0]
        ids = list(output.token_ids)
        logprobs = [step[token].logprob for step, token in zip(output.logprobs, ids)]
        finish = "length" if output.finish_reason == "length" else "eos"
        tree = await asyncio.get_running_loop().run_in_executor(
            pool, response_tree, job, rules.tokenizer, ids, logprobs, finish, self.recipe, self.clip, rules.eos_ids)
        covered = sum(len(n.token_ids) for n in tree.nodes)
        return tree, (ids[covered:], logprobs[covered:])

    def _encode(self, prompt: str, label, images, processor):
        if not images:
            images = [image_from_label(label)]
        if not hasattr(processor, "image_processor"):
            raise ValueError("CSR needs a vision-language processor; OpenRLHF passed a text tokenizer. Point "
                             "--actor.model_name_or_path at a VLM.")
        from openrlhf.utils.vlm_utils import process_prompt_with_images

        images = images if isinstance(images, list) else [images]
        prompt_ids, mm_train_inputs, pil_images = process_prompt_with_images(processor, prompt, images)
        if not pil_images:
            raise ValueError(f"no image could be loaded from {images!r}; CSR scores sentences against the image.")
        key = images[0] if isinstance(images[0], str) else f"image:{uuid.uuid4().hex}"
        return prompt_ids, mm_train_inputs, pil_images, key

    def _response(self, prompt, label, images, mm_train_inputs, prompt_ids: list[int], tree: SearchTree,
                  eos_ids: set[int], eos_tails: dict, tail, with_logprobs: bool) -> dict:
        finals = [n for n in tree.nodes if n.final and n.parent is not None]
        normalize = self.recipe.curation.length_normalize
        best = max(finals, key=lambda n: path_score([p.reward for p in _path(tree, n)], normalize), default=None)
        path = _path(tree, best) if best is not None else []
        tokens, logprobs, sentence_rewards = list(prompt_ids), [0.0] * len(prompt_ids), []
        for node in path:
            tokens += node.token_ids
            logprobs += node.logprobs
            sentence_rewards.append([len(tokens), node.reward])
        ends_with_eos = bool(path) and path[-1].token_ids[-1:] and path[-1].token_ids[-1] in eos_ids
        if tail is None and (not path or (best.finish == "eos" and not ends_with_eos)):
            tail = eos_tails.get(tuple(tokens[len(prompt_ids):]), ([], []))
        if tail is not None:
            tokens += tail[0]
            logprobs += tail[1]
        # The step reward (docs/ppo.md) is the sum: the trainer's patch centres each sentence on its prompt
        # group's mean, which keeps it from paying for length; without the patch the mean does that.
        rewards = [n.reward for n in path]
        reward = path_score(rewards, normalize and not self.recipe.ppo.dense_rewards) if path else 0.0
        count = max(len(path), 1)
        return {
            "prompt": prompt,
            "label": label,
            "images": images,
            "mm_train_inputs": mm_train_inputs,
            "observation_tokens": tokens,
            "action_ranges": [(len(prompt_ids), len(tokens))],
            "rollout_log_probs": logprobs if with_logprobs else None,
            "truncated": bool(path) and path[-1].finish == "length",
            "reward": reward,
            "scores": reward,
            "extra_logs": {"r_i": sum(n.r_i for n in path) / count, "r_t": sum(n.r_t for n in path) / count,
                           "sentences": float(len(path))},
            "csr_sentence_rewards": sentence_rewards,
            "csr_tree": tree.to_json(),
        }


def _serial(scorer):
    from csr_plugin.reward.source import SerialVisual

    return SerialVisual(scorer)


def _build_visual(recipe: Recipe):
    import dataclasses

    from csr_plugin.reward.source import build_visual_scorer
    from csr_plugin.sampling.ray_actors import engine_device

    # a tensor-parallel engine's actor sees every GPU of its node: CLIP goes to the engine's rank-0 GPU
    clip = dataclasses.replace(recipe.clip, device=engine_device(recipe.clip.device))
    return build_visual_scorer(dataclasses.replace(recipe, clip=clip))
