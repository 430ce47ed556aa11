"""Step-wise (per-sentence) rewards for OpenRLHF's PPO / REINFORCE family, without forking OpenRLHF.

OpenRLHF puts one scalar per response at its last token (``compute_reward`` in
openrlhf/models/utils.py). With this patch each sentence's step reward (step_reward.py:
its calibrated reward less the mean sentence reward of the prompt's group) sits at that
sentence's last token and flows through OpenRLHF's own advantage code (GAE, reinforce,
rloo, reinforce_baseline, group_norm, dr_grpo, flash_reinforce):

* ``SamplesGenerator._process_response_into_experience`` is wrapped to turn the agent's
  ``csr_sentence_rewards`` ([[end, reward], ...]) into per-action-token rows of rewards and
  sentence counts stored in ``experience.info`` (the only per-sample carrier that survives
  OpenRLHF's batching and Ray transport).
* ``RemoteExperienceMaker.compute_advantages_and_returns`` is wrapped to pop those rows
  (logging never sees them), centre them on each prompt group's mean sentence reward b
  (subtracting m * b from the sample's scalar reward too, m its sentence count), and run
  the original method while the ``compute_reward`` it calls returns, per sample,
  ``a * dense + (r - a * total) at the last token - kl_coef * kl``: r is OpenRLHF's shaped
  scalar (length penalties, group baseline, group_norm scaling), total the sample's sum of
  centred sentence rewards, a = 1 / (group std + 1e-9) for group_norm (0 for a group whose
  totals coincide) and 1 otherwise. With gamma = 1 the first token's return is OpenRLHF's
  scalar-mode return of the centred totals.

Installed per Ray worker by ``runtime_env()`` (a ``worker_process_setup_hook``), opt-in with
``CSR_DENSE_REWARDS=1``. docs/ppo.md, "Step-wise rewards" and "The step reward", has the
details and the reasons.
"""
from __future__ import annotations

import bisect
import contextvars
import functools
import importlib
import importlib.abc
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # torch is imported lazily: setup_hook runs in every Ray worker and must stay cheap
    import torch

ENV_VAR = "CSR_DENSE_REWARDS"
HOOK = "csr_plugin.openrlhf.dense_rewards.setup_hook"
RESPONSE_KEY = "csr_sentence_rewards"
INFO_KEY = "csr_token_rewards"
COUNT_KEY = "csr_token_sentences"
BASELINE_KEY = "step_reward_baseline"  # logged: the group's mean sentence reward b
SAMPLES_GENERATOR = "openrlhf.trainer.ppo_utils.samples_generator"
EXPERIENCE_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"
GROUP_STD_FLOOR = 1e-6
_PATCHED = "_csr_dense_rewards"  # marks our wrappers: install() is idempotent, tests can check it


def token_rewards(sentence_rewards: Sequence[Sequence[float]],
                  action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, A) float rows aligned with ``action_mask`` (1, A): the rewards and the number of
    sentences ending at each token.

    ``end`` indexes ``observation_tokens`` one past the sentence, and action position j is
    observation token j + 1 (action_mask = mask[1:max_len]), so the sentence's last token is
    action position end - 2. A sentence cut by max_len truncation, or ending on a non-action
    token, is credited to the last action position before its end; a reward with no action
    position at or before its end is dropped here (not counted, not centred), and the residual
    term of compute_reward then puts it at the last token (the row sum is what the residual
    subtracts).
    """
    import torch

    actions = torch.nonzero(action_mask[0]).flatten().tolist()  # ascending action positions
    rewards = torch.zeros(action_mask.shape, dtype=torch.float32)
    counts = torch.zeros(action_mask.shape, dtype=torch.float32)
    for end, reward in sentence_rewards:
        k = bisect.bisect_right(actions, int(end) - 2) - 1
        if k >= 0:
            rewards[0, actions[k]] += float(reward)
            counts[0, actions[k]] += 1.0
    return rewards, counts


def _wrap_once(owner: Any, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """``owner.name = wrap(owner.name)``, marked as ours, unless it already is (install() is idempotent)."""
    original = getattr(owner, name)
    if getattr(original, _PATCHED, False):
        return
    wrapped = functools.wraps(original)(wrap(original))
    setattr(wrapped, _PATCHED, True)
    setattr(owner, name, wrapped)


# ── samples_generator: response dict -> per-token reward row ──


def _dense_process_response(process: Callable) -> Callable:
    def _process_response_into_experience(self, response, **generate_kwargs):
        experience = process(self, response, **generate_kwargs)
        # Every sample gets a row, zeros when the agent sent none: OpenRLHF merges info dicts
        # key by key, so a micro-batch where only some samples had the key would misalign rows.
        # A zero row is exactly the scalar path (a * 0 + (r - a * 0) at the last token).
        experience.info[INFO_KEY], experience.info[COUNT_KEY] = token_rewards(response.get(RESPONSE_KEY) or [],
                                                                              experience.action_mask)
        return experience

    return _process_response_into_experience


def _patch_samples_generator(module: ModuleType) -> None:
    _wrap_once(module.SamplesGenerator, "_process_response_into_experience", _dense_process_response)


# ── experience_maker: dense rewards through OpenRLHF's own advantage code ──

class _DenseBatch:
    """One compute_advantages_and_returns call: its experiences and their token reward rows.

    compute_reward(reward, kl_coef, experience.kl, action_mask=experience.action_mask, ...)
    is matched to its experience by the identity of the action_mask tensor: OpenRLHF passes
    the experience's own tensor and never rebuilds it there, and a call that matches none
    raises instead of silently falling back to scalar rewards.
    """

    def __init__(self, estimator: str, experiences: list, rows: list[torch.Tensor], counts: list[torch.Tensor]):
        self.group_norm = estimator == "group_norm"
        self.by_mask = {id(e.action_mask): (e, row, count) for e, row, count in zip(experiences, rows, counts)}

    def lookup(self, action_mask: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor]:
        try:
            return self.by_mask[id(action_mask)]
        except KeyError:
            raise RuntimeError(
                "csr dense rewards: compute_reward was called with an action_mask of no experience in this "
                "batch; OpenRLHF's compute_advantages_and_returns changed and dense_rewards.py needs updating."
            ) from None


_BATCH: contextvars.ContextVar[_DenseBatch | None] = contextvars.ContextVar("csr_dense_batch", default=None)


def _dense_compute_reward(scalar: Callable) -> Callable:
    """experience_maker's compute_reward: OpenRLHF's own outside a dense batch, dense inside one."""

    def compute_reward(r, kl_coef, kl, action_mask=None, reward_clip_range=None):
        import torch

        batch = _BATCH.get()
        if batch is None:
            return scalar(r, kl_coef, kl, action_mask=action_mask, reward_clip_range=reward_clip_range)
        experience, row, count = batch.lookup(action_mask)
        if row.shape != action_mask.shape:
            raise RuntimeError(f"csr dense rewards: reward rows {tuple(row.shape)} do not match the action mask "
                               f"{tuple(action_mask.shape)}")
        # group_norm divides the centred totals by (std + 1e-9); the same divisor on the sentence
        # rewards keeps the sum over tokens equal to OpenRLHF's scalar. OpenRLHF logs that std
        # per sample under info["group_reward_std"] from the very tensor it normalises with.
        # A group whose totals coincide (sigma below GROUP_STD_FLOOR) carries no signal: OpenRLHF's
        # scalar is ~0 there, and sentence rewards divided by ~1e-9 would blow up the tokens in between,
        # so such samples get no dense part (their returns are OpenRLHF's scalar, ~0, at every token).
        divisor = 1.0
        if batch.group_norm:
            std = experience.info["group_reward_std"].unsqueeze(1)
            divisor = torch.where(std > GROUP_STD_FLOOR, std + 1e-9, torch.full_like(std, float("inf")))
        dense = row / divisor
        # OpenRLHF's compute_reward places what is left of its scalar (baseline, length penalties,
        # any part of `reward` not in the sentences) at the last token, clamps it and adds the KL.
        residual = r - dense.sum(-1)
        if reward_clip_range:  # the same bound on each token's sentence reward; other tokens stay 0
            dense = torch.where(count != 0, dense.clamp(*reward_clip_range), dense)
        reward = scalar(residual, kl_coef, kl, action_mask=action_mask, reward_clip_range=reward_clip_range)
        return reward + dense.to(reward.dtype)

    return compute_reward


def _centre_on_group_means(experiences: list, rows: list, counts: list, group_size: int) -> list[torch.Tensor]:
    """step_reward.py's centring, in place: each sample's scalar reward loses m * b (m its sentence count,
    b its prompt group's mean sentence reward); returns the reward rows less b * (sentences per token).

    Samples are grouped as OpenRLHF groups them, by ``experience.index`` (the rollout order), so
    micro-batches that cut across prompt groups or arrive reordered are centred alike.
    """
    import torch

    from csr_plugin.openrlhf.step_reward import group_baselines

    indices = torch.tensor([i for experience in experiences for i in experience.index])
    sums, sentences = torch.empty(len(indices)), torch.empty(len(indices))
    sums[indices] = torch.cat([row.sum(-1) for row in rows])
    sentences[indices] = torch.cat([count.sum(-1) for count in counts])
    baselines = group_baselines(sums, sentences, group_size)[indices].split([len(e.index) for e in experiences])
    centred = []
    for experience, row, count, baseline in zip(experiences, rows, counts, baselines):
        rewards = experience.rewards.to(torch.promote_types(experience.rewards.dtype, torch.float32))
        experience.rewards = rewards - baseline * count.sum(-1)
        experience.info[BASELINE_KEY] = baseline
        centred.append(row - baseline.unsqueeze(1) * count)
    return centred


def _dense_advantages(compute: Callable) -> Callable:
    def compute_advantages_and_returns(self, experiences):
        rows = [experience.info.pop(INFO_KEY, None) for experience in experiences]
        counts = [experience.info.pop(COUNT_KEY, None) for experience in experiences]
        if not any(count is not None and bool(count.any()) for count in counts):
            return compute(self, experiences)  # scalar rewards only: OpenRLHF as is
        if any(row is None or count is None for row, count in zip(rows, counts)):
            raise RuntimeError("csr dense rewards: some experiences carry no sentence rows; every sample must "
                               "come through the patched _process_response_into_experience.")
        args = self.strategy.args
        rows = _centre_on_group_means(experiences, rows, counts, args.rollout.n_samples_per_prompt)
        token = _BATCH.set(_DenseBatch(args.algo.advantage.estimator, experiences, rows, counts))
        try:
            return compute(self, experiences)
        finally:
            _BATCH.reset(token)

    return compute_advantages_and_returns


def _patch_experience_maker(module: ModuleType) -> None:
    _wrap_once(module, "compute_reward", _dense_compute_reward)
    _wrap_once(module.RemoteExperienceMaker, "compute_advantages_and_returns", _dense_advantages)


_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    SAMPLES_GENERATOR: _patch_samples_generator,
    EXPERIENCE_MAKER: _patch_experience_maker,
}


def install() -> None:
    """Patch OpenRLHF in this process now (imports its trainer modules; idempotent)."""
    for name, patch in _PATCHES.items():
        patch(importlib.import_module(name))


# ── Ray workers: patch on import ──

class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then the patch, before the module is handed to the importer."""

    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name: str):  # get_source, get_code, ... for tracebacks and inspect
        return getattr(self.loader, name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Post-import hook: a process pays nothing unless it imports OpenRLHF's trainer modules."""

    def find_spec(self, fullname, path, target=None):
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def setup_hook() -> None:
    """Ray ``worker_process_setup_hook``: patch OpenRLHF when (or if) this worker imports it.

    Opt-in: does nothing unless ``CSR_DENSE_REWARDS=1``.
    """
    if os.environ.get(ENV_VAR) != "1":
        return
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def runtime_env(extra_env: dict[str, str] | None = None) -> dict:
    """The Ray runtime_env for ``ray.init``: the setup hook, ``CSR_DENSE_REWARDS=1`` and ``extra_env``."""
    return {"worker_process_setup_hook": HOOK, "env_vars": {**(extra_env or {}), ENV_VAR: "1"}}
