"""The reward server against OpenRLHF's own HTTP client and its retry policy, on a compressed clock.

OpenRLHF 0.11.2's client (openrlhf/utils/agent.py, ``_fetch_rewards_via_http``) waits 180 s per try
and tries 5 times, 1 s apart, after any error. Here its 180 s and the server's default timeout are
both divided by SCALE, which keeps their order (the server's is the longer); the client's 1 s pause
and everything else is its own code. Every socket is on 127.0.0.1, on a free port.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import aiohttp
import pytest

from csr_plugin.openrlhf.response_reward import ScoredResponse
from csr_plugin.openrlhf.reward_server import DEFAULT_TIMEOUT_S, RewardServer

SCALE = 100  # client 1.8 s, server 2.0 s
PROMPT = "USER: <image>\nDescribe the image in detail. ASSISTANT:"


class SlowScorer:
    """No model: reward = the response's length; ``seconds`` per batch; records every response scored."""

    image_token = "<image>"

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.scored: list[str] = []

    def image(self, path):
        return None

    def score(self, items):
        time.sleep(self.seconds)
        self.scored.extend(item.response_text for item in items)
        return [ScoredResponse(float(len(item.response_text)), []) for item in items]


class ScaledAiohttp:
    """aiohttp as OpenRLHF's agent module sees it, with every ClientTimeout divided by SCALE."""

    def __getattr__(self, name):
        return getattr(aiohttp, name)

    @staticmethod
    def ClientTimeout(total=None, **kwargs):  # noqa: N802 - aiohttp's name
        return aiohttp.ClientTimeout(total=total / SCALE, **kwargs)


@pytest.mark.timeout(120)
def test_openrlhf_client_retries_never_duplicate_work(monkeypatch, caplog):
    """40 distinct requests at once from OpenRLHF's client into a server that holds 20 (4 being scored,
    16 queued) and scores 4 per 0.15 s. A queued request waits up to (16 / 4 + 1) * 0.15 = 0.75 s: under
    the client's 1.8 s, so no client gives up on work the server still does, and the overflow is
    answered 503 at once and retried by the client 1 s later; but over the old 30 s server default
    (0.3 s here), which answered 504 to requests still queued or being scored, and the client's retry
    then scored them again. Each request must be scored exactly once if it completed and never if it
    did not, and every answer must be a 200 or a 503 (no 504, no client gone)."""
    from openrlhf.utils import agent

    monkeypatch.setattr(agent, "aiohttp", ScaledAiohttp())
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    scorer = SlowScorer(0.15)
    responses = [f" Response number {i}." for i in range(40)]

    async def post_all(url):
        executor = agent.SingleTurnAgentExecutor(remote_rm_url=[url])
        return await asyncio.gather(*(executor._fetch_rewards_via_http([PROMPT + r], [PROMPT], ["x.png"])
                                      for r in responses), return_exceptions=True)

    started = time.perf_counter()
    with RewardServer(scorer, max_batch=4, max_queue=16, timeout_s=DEFAULT_TIMEOUT_S / SCALE) as server:
        results = asyncio.run(post_all(f"http://127.0.0.1:{server.port}/get_reward"))
    elapsed = time.perf_counter() - started

    statuses = Counter(r.args[-1] for r in caplog.records if r.name == "uvicorn.access")
    completed = [r for r, result in zip(responses, results) if not isinstance(result, BaseException)]
    for response, result in zip(responses, results):
        if isinstance(result, BaseException):  # OpenRLHF's give-up after 5 tries, every one a 503
            assert isinstance(result, RuntimeError) and "Request error for 5 times" in str(result), result
        else:
            assert result[0]["rewards"] == [float(len(response))], (response, result)
    print(f"\n{len(completed)} of {len(responses)} completed in {elapsed:.1f} s; answers {dict(statuses)}")
    assert Counter(scorer.scored) == Counter(completed), "a request was scored twice, or scored and not answered"
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] == len(completed)
    assert statuses[503] >= 5 * (len(responses) - len(completed))
    assert statuses[503] > 0, "the queue never filled: this load did not test retries"
    assert len(completed) >= 20, "fewer requests completed than the first round alone holds"
