"""Step-wise rewards (csr_plugin/openrlhf/dense_rewards.py) through OpenRLHF's REAL advantage code.

Experiences come from OpenRLHF's own (patched) ``_process_response_into_experience`` and
``split_rollout_samples``; advantages from its own ``compute_advantages_and_returns``.
OpenRLHF's trainer modules import vLLM, which a CPU box does not have: a test-only stub
package stands in for it (in this process and, through PYTHONPATH, in the Ray workers).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import SimpleNamespace as NS

import pytest
import torch

from csr_plugin.openrlhf import dense_rewards as dr

VLLM_STUB = {
    "__init__.py": "class SamplingParams:\n    def __init__(self, *args, **kwargs):\n        pass\n",
    "inputs.py": "TokensPrompt = dict\n",
    "utils.py": "def random_uuid():\n    return '0'\n",
}


@pytest.fixture(scope="module")
def vllm_path(tmp_path_factory):
    """A directory to put first on the Python path so that ``import vllm`` works (None: the real one is there)."""
    if importlib.util.find_spec("vllm") is not None:
        return None
    root = tmp_path_factory.mktemp("vllm_stub")
    (root / "vllm").mkdir()
    for name, text in VLLM_STUB.items():
        (root / "vllm" / name).write_text(text)
    return str(root)


@pytest.fixture(scope="module")
def orl(vllm_path):
    """OpenRLHF's trainer modules with the patch installed; every change is undone afterwards."""
    if vllm_path:
        sys.path.insert(0, vllm_path)
    em = importlib.import_module(dr.EXPERIENCE_MAKER)
    sg = importlib.import_module(dr.SAMPLES_GENERATOR)
    originals = [(em.RemoteExperienceMaker, "compute_advantages_and_returns"),
                 (sg.SamplesGenerator, "_process_response_into_experience"), (em, "compute_reward")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in originals]
    assert not any(getattr(value, dr._PATCHED, False) for _, _, value in saved), "patched before the test"
    dr.install()
    dr.install()  # idempotent
    yield NS(em=em, sg=sg, scalar={name: value for _, name, value in saved})
    for owner, name, value in saved:
        setattr(owner, name, value)
    if vllm_path:
        sys.path.remove(vllm_path)
        for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
            del sys.modules[name]


@pytest.fixture
def unpatched(orl, monkeypatch):
    """Inside a test: OpenRLHF exactly as shipped (restored when the test ends)."""
    monkeypatch.setattr(orl.em.RemoteExperienceMaker, "compute_advantages_and_returns",
                        orl.scalar["compute_advantages_and_returns"])
    monkeypatch.setattr(orl.sg.SamplesGenerator, "_process_response_into_experience",
                        orl.scalar["_process_response_into_experience"])
    monkeypatch.setattr(orl.em, "compute_reward", orl.scalar["compute_reward"])


# ── building OpenRLHF objects from hand-made agent responses ──

def response(prompt_len: int, response_len: int, reward: float, sentences=None, truncated: bool = False) -> dict:
    """An agent response dict: prompt tokens, then one action range with the response tokens."""
    out = {"prompt": "p", "label": "l", "observation_tokens": list(range(prompt_len + response_len)),
           "action_ranges": [(prompt_len, prompt_len + response_len)], "rollout_log_probs": None,
           "reward": reward, "scores": reward, "truncated": truncated}
    if sentences is not None:
        out[dr.RESPONSE_KEY] = [list(s) for s in sentences]
    return out


def args_for(estimator: str, n: int = 1, micro: int = 2, gamma: float = 1.0, lambd: float = 1.0,
             clip=None, **reward) -> NS:
    """Exactly the attributes split_rollout_samples / compute_advantages_and_returns read."""
    return NS(algo=NS(advantage=NS(estimator=estimator, gamma=gamma, lambd=lambd, no_std_norm=False)),
              rollout=NS(n_samples_per_prompt=n, micro_batch_size=micro),
              train=NS(dynamic_batch_enable=False), reward=NS(clip_range=clip, **reward))


def run(orl, args, responses, kl_coef=0.0, kl=None, values=None, max_len=2048, reverse=False):
    """responses -> OpenRLHF Experiences -> micro-batches -> advantages; returns the micro-batches."""
    maker = orl.em.RemoteExperienceMaker(None, None, None, None, NS(value=kl_coef), NS(args=args), NS(pad_token_id=0))
    generator = object.__new__(orl.sg.SamplesGenerator)
    samples = [generator._process_response_into_experience(r, max_len=max_len) for r in responses]
    batches = maker.split_rollout_samples(samples)
    for batch in batches:
        width = batch.action_mask.shape[1]  # per-sample tensors are cut to the micro-batch's padded width
        batch.kl = torch.stack([kl[i][:width] for i in batch.index]) if kl else torch.zeros(batch.action_mask.shape)
        if values is not None:
            batch.values = torch.stack([values[i][:width] for i in batch.index])
    out = maker.compute_advantages_and_returns(batches[::-1] if reverse else batches)
    return out[::-1] if reverse else out


def returns_of(batches) -> list[torch.Tensor]:
    """Per sample, in rollout order: the returns at its action positions."""
    per_sample = {}
    for batch in batches:
        for row, i in enumerate(batch.index):
            per_sample[i] = batch.returns[row][batch.action_mask[row].bool()]
    return [per_sample[i] for i in sorted(per_sample)]


# Prompt of 3 tokens, response of 8 (observation tokens 3..10, action positions 2..9).
# Sentences end (exclusive) at observation 6, 9, 11 -> last tokens 5, 8, 10 -> action positions 4, 7, 9.
# Their mean is 1.0: alone in its prompt group (n = 1) the sample's step rewards are 0.5, -2.5, 2.0.
THREE = [(6, 1.5), (9, -1.5), (11, 3.0)]


def test_rewards_sit_at_sentence_ends_and_returns_are_the_rewards_still_ahead(orl):
    plain = response(2, 3, 0.75)  # no sentence rewards: scalar at its last token, in the same micro-batch
    # two prompts of two rollouts: THREE with a twin of mean 1.0 (b = 1.0), the plain one with a twin
    batches = run(orl, args_for("reinforce", n=2, micro=4),
                  [response(3, 8, 3.0, THREE), response(3, 2, 1.0, [(5, 1.0)]), plain, plain])
    dense, _, scalar, _ = returns_of(batches)
    # action positions 2..4 still have all three step rewards ahead, 5..7 the last two, 8..9 the last one
    assert dense.tolist() == [0.0, 0.0, 0.0, -0.5, -0.5, -0.5, 2.0, 2.0]
    assert dense[0].item() == 0.0  # the first token's return is the centred total 3.0 - 3 x 1.0
    full = batches[0].returns[0]  # (A,) over all positions; gamma = 1: reward_t = G_t - G_{t+1}
    rewards = full - torch.cat([full[1:], torch.zeros(1)])
    assert rewards[2:].tolist() == [0.0, 0.0, 0.5, 0.0, 0.0, -2.5, 0.0, 2.0]
    assert scalar.tolist() == [0.75, 0.75, 0.75]  # no sentences: nothing centred, OpenRLHF's scalar
    assert batches[0].info["return"].tolist() == [0.0, 0.0, 0.75, 0.75]  # OpenRLHF's logged per-sample return
    assert batches[0].info[dr.BASELINE_KEY].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert dr.INFO_KEY not in batches[0].info and dr.COUNT_KEY not in batches[0].info  # popped before logging


def test_kl_penalty_is_added_at_every_token(orl):
    # prompt 2 + response 4: action positions 1..4; sentences end at action 2 (reward 1) and 4 (reward 3);
    # alone in its group, b = 2: step rewards -1 and 1, total 0
    kl = [torch.tensor([0.5, 1.0, 2.0, 0.0, 4.0])]
    (returns,) = returns_of(run(orl, args_for("reinforce"), [response(2, 4, 4.0, [(4, 1.0), (6, 3.0)])],
                                kl_coef=0.5, kl=kl))
    # token rewards: -0.5, -1 - 1.0, 0, 1 - 2.0  ->  returns -3.5, -3, -1, -1
    assert returns.tolist() == [-3.5, -3.0, -1.0, -1.0]


def test_gae_runs_openrlhf_own_gae_on_the_dense_rewards(orl):
    gamma, lambd, kl_coef = 0.9, 0.8, 0.1
    kl = [torch.linspace(0.0, 0.9, 10)]
    values = [torch.tensor([0.0, 0.0, 0.3, -0.2, 0.5, 0.1, 0.4, -0.3, 0.2, 0.6])]
    (batch,) = run(orl, args_for("gae", gamma=gamma, lambd=lambd), [response(3, 8, 3.0, THREE)],
                   kl_coef=kl_coef, kl=kl, values=values)
    expected = torch.zeros(1, 10)
    expected[0, 4], expected[0, 7], expected[0, 9] = 0.5, -2.5, 2.0  # THREE less its mean 1.0
    expected -= kl_coef * kl[0]
    gae = object.__new__(orl.em.RemoteExperienceMaker).get_advantages_and_returns  # stateless
    _, want = gae(values[0][None], expected, batch.action_mask, gamma, lambd)
    assert torch.allclose(batch.returns, want, atol=1e-6)


def group_responses():
    """2 prompts x 3 samples: different lengths, sentence counts and rewards; sample 4 was truncated."""
    specs = [  # (prompt_len, [(sentence length, reward), ...])
        (3, [(2, 1.0), (3, 0.5)]), (2, [(4, -1.0)]), (3, [(1, 0.25), (2, 0.25), (2, 1.5)]),
        (2, [(3, 2.0), (1, -0.5)]), (3, [(2, 0.75), (2, 0.75)]), (2, [(5, -0.25), (1, 1.0), (2, 0.5)]),
    ]
    out = []
    for i, (prompt_len, sentences) in enumerate(specs):
        ends, end = [], prompt_len
        for length, reward in sentences:
            end += length
            ends.append((end, reward))
        out.append(response(prompt_len, end - prompt_len, sum(r for _, r in sentences), ends, truncated=i == 4))
    return out


def centred(responses, n):
    """The responses with each sentence reward less its prompt group's mean sentence reward, by hand."""
    out = []
    for g in range(0, len(responses), n):
        group = responses[g:g + n]
        sentences = [reward for r in group for _, reward in r[dr.RESPONSE_KEY]]
        b = sum(sentences) / len(sentences)
        for r in group:
            steps = [(end, reward - b) for end, reward in r[dr.RESPONSE_KEY]]
            out.append({**r, "reward": sum(s for _, s in steps), dr.RESPONSE_KEY: steps})
    return out


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce"])
def test_group_baselines_apply_to_the_whole_response(orl, request, estimator):
    # micro-batches of 2 cut across the prompt groups of 3 and are handed over in reverse order;
    # the ProRL stop-properly penalty halves sample 4's scalar (it reaches only the last token)
    args = args_for(estimator, n=3, micro=2, stop_properly_penalty_coef=0.5)
    responses = group_responses()
    dense = returns_of(run(orl, args, responses, reverse=True))
    # OpenRLHF's unpatched scalar path, given the centred totals (computed by hand) as the rewards
    steps = centred(responses, 3)
    request.getfixturevalue("unpatched")
    scalar = returns_of(run(orl, args_for(estimator, n=3, micro=2, stop_properly_penalty_coef=0.5), steps,
                            reverse=True))

    totals = torch.tensor([r["reward"] * (0.5 if r["truncated"] else 1.0) for r in steps])
    assert abs(totals[3:].sum()) > 0.1  # the penalty on sample 4 breaks its group's zero sum: a real baseline
    stds = totals.reshape(-1, 3).std(-1).repeat_interleave(3)
    for i, r in enumerate(steps):
        assert torch.allclose(dense[i][0], scalar[i][0], atol=1e-6), (i, dense[i], scalar[i])
        assert torch.all(scalar[i] == scalar[i][0])  # OpenRLHF: one value over the whole response
        a = 1.0 / (stds[i].item() + 1e-9) if estimator == "group_norm" else 1.0
        first_action = len(r["observation_tokens"]) - len(dense[i]) - 1
        earned = torch.tensor([sum(rew for end, rew in r[dr.RESPONSE_KEY] if end - 2 < first_action + t)
                               for t in range(len(dense[i]))])
        assert torch.allclose(dense[i], scalar[i][0] - a * earned, atol=1e-5), (i, dense[i], scalar[i])


def test_group_norm_group_of_equal_totals_gets_no_dense_part(orl):
    # three rollouts of one prompt whose totals coincide (1.5) but whose sentences differ
    sentences = [[(6, 1.0), (9, 0.5)], [(6, 2.0), (9, -0.5)], [(6, 0.0), (9, 1.5)]]
    responses = [response(3, 6, 1.5, s) for s in sentences]
    for returns in returns_of(run(orl, args_for("group_norm", n=3, micro=3), responses)):
        # OpenRLHF's scalar group_norm gives (1.5 - 1.5) / (0 + 1e-9) = 0; so does every token here
        assert torch.equal(returns, torch.zeros_like(returns))


def test_clip_range_bounds_each_sentence_reward_and_openrlhf_scalar_residual(orl):
    (returns,) = returns_of(run(orl, args_for("reinforce", clip=(-1.0, 1.0)),
                                [response(3, 8, 3.0, [(6, 4.0), (9, -1.5), (11, 0.5)])]))
    # b = 1.0: step rewards 3.0 -> 1.0 at action 4, -2.5 -> -1.0 at action 7, -0.5 kept at action 9;
    # the residual 0 - 0 = 0 is computed from the unclamped values, so nothing comes back at the end
    assert returns.tolist() == [-0.5, -0.5, -0.5, -1.5, -1.5, -1.5, -0.5, -0.5]


@pytest.mark.parametrize("estimator", ["gae", "reinforce", "rloo", "group_norm"])
def test_scalar_mode_is_openrlhf_unchanged(orl, request, estimator):
    responses = [response(2 + i % 2, 3 + i, 0.5 * i - 0.75) for i in range(4)]
    kl = [torch.linspace(-0.2, 0.3, 8) * (i + 1) for i in range(4)]
    values = [torch.linspace(0.1, 0.8, 8) - 0.1 * i for i in range(4)]

    def outputs():
        batches = run(orl, args_for(estimator, n=2, gamma=0.95, lambd=0.9, clip=(-1.0, 1.0)), responses,
                      kl_coef=0.05, kl=kl, values=values if estimator == "gae" else None)
        return [(b.returns, b.advantages, b.info["return"]) for b in batches]

    patched = outputs()
    request.getfixturevalue("unpatched")
    for got, want in zip(patched, outputs(), strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_truncated_sentences_land_on_the_last_kept_action(orl):
    # max_len 8 keeps observation tokens 0..7: action positions 2..6; sentences 2 and 3 end beyond
    batches = run(orl, args_for("reinforce"), [response(3, 8, 3.0, THREE)], max_len=8)
    (returns,) = returns_of(batches)
    assert batches[0].action_mask.shape == (1, 7)
    assert returns.tolist() == [0.0, 0.0, 0.0, -0.5, -0.5]  # step rewards -2.5 + 2.0 both at action position 6


def test_token_rewards_skip_non_action_tokens(orl):
    # multi-turn: actions 1..2 and 5..6. A sentence whose last token is action 4 (an environment
    # token) goes to action 2, the last action before it; one past max_len to action 6; one
    # before any action (last token at position 0) is dropped, so the scalar residual carries it
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 1]])
    rewards, counts = dr.token_rewards([(2, 8.0), (4, 1.0), (6, 2.0), (9, 4.0)], mask)
    assert rewards.tolist() == [[0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 4.0]]
    assert counts.tolist() == [[0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.0]]  # the dropped one is not counted either


def test_setup_hook_is_opt_in_and_patches_on_import(orl, unpatched, monkeypatch):
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delenv(dr.ENV_VAR, raising=False)
    dr.setup_hook()
    assert not any(isinstance(f, dr._PatchOnImport) for f in sys.meta_path)
    assert not getattr(orl.em.RemoteExperienceMaker.compute_advantages_and_returns, dr._PATCHED, False)

    # on: a module imported from now on is patched as it loads (a fresh experience_maker here)
    package = sys.modules["openrlhf.trainer.ppo_utils"]
    monkeypatch.setattr(package, "experience_maker", orl.em)
    monkeypatch.delitem(sys.modules, dr.EXPERIENCE_MAKER)
    monkeypatch.setenv(dr.ENV_VAR, "1")
    dr.setup_hook()
    fresh = importlib.import_module(dr.EXPERIENCE_MAKER)
    assert fresh is not orl.em
    assert getattr(fresh.RemoteExperienceMaker.compute_advantages_and_returns, dr._PATCHED, False)
    assert getattr(fresh.compute_reward, dr._PATCHED, False)
    # ... and one already imported is patched at once
    assert getattr(orl.sg.SamplesGenerator._process_response_into_experience, dr._PATCHED, False)


def test_runtime_env_installs_the_patch_in_ray_workers(vllm_path):
    import ray

    python_path = os.pathsep.join(p for p in [vllm_path, os.environ.get("PYTHONPATH")] if p)
    extra = {"FLASH_ATTENTION_TRITON_AMD_ENABLE": "TRUE", "PYTHONPATH": python_path}
    env = dr.runtime_env(extra)
    assert env == {"worker_process_setup_hook": dr.HOOK, "env_vars": {**extra, dr.ENV_VAR: "1"}}

    def probe():  # defined here so Ray ships it by value
        from openrlhf.trainer.ppo_utils import experience_maker, samples_generator

        return [getattr(f, "_csr_dense_rewards", False) for f in (
            experience_maker.RemoteExperienceMaker.compute_advantages_and_returns, experience_maker.compute_reward,
            samples_generator.SamplesGenerator._process_response_into_experience)]

    ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env=env, log_to_driver=False)
    try:
        remote = ray.remote(probe)
        # a worker imports OpenRLHF (and vLLM) before it answers: > 120 s on 2 cores shared with other jobs
        assert ray.get(remote.remote(), timeout=600) == [True, True, True]
        off = {"env_vars": {**env["env_vars"], dr.ENV_VAR: "0"}}
        assert ray.get(remote.options(runtime_env=off).remote(), timeout=600) == [False, False, False]
    finally:
        ray.shutdown()
