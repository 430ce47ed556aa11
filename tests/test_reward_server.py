"""CSR's response reward behind OpenRLHF's hooks: the scorer's arithmetic, its agreement with a
plain forward, reward_func as OpenRLHF loads and calls it, and the HTTP server (FastAPI + uvicorn)
under load and abuse: sizes, image paths, methods, clients that leave.

Every socket is on 127.0.0.1, on a free port the system picks (port 0).
"""
from __future__ import annotations

import asyncio
import copy
import http.client
import inspect
import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch
import yaml

from csr_plugin.config import recipe_from_dict
from csr_plugin.openrlhf.response_reward import (ResponseItem, ResponseRewardScorer, ScoredResponse,
                                                 openrlhf_items, sentence_spans)
from csr_plugin.openrlhf.reward_server import (DEFAULT_MAX_REQUEST_BYTES, DEFAULT_TIMEOUT_S,
                                               OPENRLHF_CLIENT_TIMEOUT_S, RewardServer, serve)

PROMPT = "USER: <image>\nDescribe the image in detail. ASSISTANT:"
OTHER_PROMPT = "USER: <image>\nWhat shapes do you see? ASSISTANT:"


@pytest.fixture(scope="module")
def images(tiny_root) -> list[str]:
    return sorted(str(p) for p in (tiny_root / "prompts" / "images").glob("*.png"))


def _recipe(tiny_recipe_dict, **sections):
    data = copy.deepcopy(tiny_recipe_dict)
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return recipe_from_dict(data)


@pytest.fixture(scope="module")
def scorer(tiny_model_and_processor, tiny_clip, tiny_recipe_dict):
    model, processor = tiny_model_and_processor
    return ResponseRewardScorer(model, processor, tiny_clip, _recipe(tiny_recipe_dict))


# ------------------------------------------------------------------ (a) sentences and arithmetic
def test_sentence_spans_split_like_the_search():
    text = "A red circle. A blue square."
    assert [text[s:e] for s, e in sentence_spans(text, ["."])] == ["A red circle.", " A blue square."]
    text = "A red circle. A blue"  # a trailing fragment without delimiter is a last sentence
    assert [text[s:e] for s, e in sentence_spans(text, ["."])] == ["A red circle.", " A blue"]
    assert len(sentence_spans("It is 3.5 cm wide. \n", ["."])) == 1  # '3.5' ends nothing; blank tail is none
    assert len(sentence_spans('"Stop." she said!', [".", "!"])) == 2  # a closing quote may follow the delimiter
    assert sentence_spans("  \n", ["."]) == []


class FakeClip:
    """R_I looked up by sentence text."""

    def __init__(self, table):
        self.table = table
        self.batches = []

    def score(self, items):
        self.batches.append(len(items))
        return [self.table[text] for _, _, text in items]


# Hand-chosen token log-probs, one per word-or-period token of each (EOS-stripped) response.
FAKE_LOGPROBS = {"A red circle. A blue square.": [-1.0, -2.0, -3.0, -2.0, -0.5, -0.5, -1.0, 0.0],
                 "Two shapes": [-1.0, -3.0]}


def _fake_response_logprobs(items):
    out = []
    for item in items:
        tokens = list(re.finditer(r"\s*[^\s.]+|\.", item.response_text))
        logprobs = FAKE_LOGPROBS[item.response_text]
        assert len(tokens) == len(logprobs), "the fake table must give one log-prob per token"
        out.append(([m.span() for m in tokens], logprobs))
    return out


def _fake_scorer(tiny_model_and_processor, tiny_recipe_dict, monkeypatch, **sections):
    _, processor = tiny_model_and_processor
    clip = FakeClip({"A red circle.": 20.0, "A blue square.": 30.0, "Two shapes": 10.0})
    scorer = ResponseRewardScorer(None, processor, clip, _recipe(tiny_recipe_dict, **sections))
    monkeypatch.setattr(scorer, "_response_logprobs", _fake_response_logprobs)
    monkeypatch.setattr(scorer, "image", lambda path: None)
    return scorer


def test_response_reward_arithmetic_by_hand(tiny_model_and_processor, tiny_recipe_dict, monkeypatch):
    """lambda = 0.9, R_T = mean token log-prob, response reward = mean over sentences.

    "A red circle."   R_T = (-1 - 2 - 3 - 2) / 4 = -2.0,    R_I = 20 -> 0.9*20 + 0.1*(-2.0) = 17.8
    " A blue square." R_T = (-0.5 - 0.5 - 1 + 0) / 4 = -0.5, R_I = 30 -> 0.9*30 + 0.1*(-0.5) = 26.95
    response: (17.8 + 26.95) / 2 = 22.375   (sum form: 44.75)
    "Two shapes</s>": EOS stripped, a fragment: R_T = -2.0, R_I = 10 -> 9 - 0.2 = 8.8
    "</s>": empty -> 0.0, no sentences.
    """
    scorer = _fake_scorer(tiny_model_and_processor, tiny_recipe_dict, monkeypatch)
    items = [ResponseItem(PROMPT, "A red circle. A blue square.", "a.png"),
             ResponseItem(PROMPT, "Two shapes</s>", "b.png"),
             ResponseItem(PROMPT, "</s>", "c.png")]
    first, fragment, empty = scorer.score(items)
    assert [s["text"] for s in first.sentences] == ["A red circle.", "A blue square."]
    assert [s["r_t"] for s in first.sentences] == pytest.approx([-2.0, -0.5])
    assert [s["r_i"] for s in first.sentences] == [20.0, 30.0]
    assert [s["reward"] for s in first.sentences] == pytest.approx([17.8, 26.95])
    assert first.reward == pytest.approx(22.375)
    assert (first.r_i, first.r_t) == pytest.approx((25.0, -1.25))
    assert fragment.reward == pytest.approx(8.8) and len(fragment.sentences) == 1
    assert (empty.reward, empty.sentences) == (0.0, [])
    assert scorer.clip.batches == [3]  # every sentence of the batch in one CLIP call

    summed = _fake_scorer(tiny_model_and_processor, tiny_recipe_dict, monkeypatch,
                          curation={"length_normalize": False})
    assert summed.score(items[:1])[0].reward == pytest.approx(44.75)


def test_rank_fusion_is_refused(tiny_model_and_processor, tiny_clip, tiny_recipe_dict):
    model, processor = tiny_model_and_processor
    with pytest.raises(ValueError, match="reward.fusion"):
        ResponseRewardScorer(model, processor, tiny_clip, _recipe(tiny_recipe_dict, reward={"fusion": "rank"}))


def test_a_sentence_no_token_starts_in_joins_the_previous(tiny_model_and_processor, tiny_recipe_dict, monkeypatch):
    # The token ". Yo." begins in "Hi." and covers " Yo.": that sentence has no token of its own.
    scorer = _fake_scorer(tiny_model_and_processor, tiny_recipe_dict, monkeypatch)
    sentences = scorer._sentences("Hi. Yo. Ok.", [(0, 2), (2, 7), (7, 10), (10, 11)], [-1.0, -2.0, -3.0, -4.0])
    assert sentences == [("Hi. Yo.", [-1.0, -2.0]), ("Ok.", [-3.0, -4.0])]


def test_openrlhf_items_collapse_the_expanded_image_and_read_labels():
    query = PROMPT.replace("<image>", "<image>" * 16) + " A cat.</s>"
    items = openrlhf_items([query, PROMPT + " B."], [PROMPT, PROMPT], ['{"image": "x.png"}', "y.png"], "<image>")
    assert [(i.response_text, i.image) for i in items] == [(" A cat.</s>", "x.png"), (" B.", "y.png")]
    with pytest.raises(ValueError, match="entry 0: query does not start with its prompt"):
        openrlhf_items(["something else"], [PROMPT], ["x.png"], "<image>")
    with pytest.raises(ValueError, match="carries no image"):
        openrlhf_items([PROMPT], [PROMPT], ['{"path": "x.png"}'], "<image>")


# ------------------------------------------------------------------ (b) real tiny models
def _plain_logprobs(model, processor, prompt, response, image):
    """Per-token log-probs of ``response`` from an unbatched, unpadded forward with full logits."""
    inputs = processor(images=image, text=prompt, add_special_tokens=False, return_tensors="pt")
    response_ids = processor.tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = torch.cat([inputs["input_ids"], torch.tensor([response_ids])], dim=1)
    with torch.inference_mode():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0].float()
    logp = logits[inputs["input_ids"].shape[1] - 1:-1].log_softmax(-1)
    return response_ids, logp.gather(-1, torch.tensor(response_ids)[:, None]).squeeze(-1).tolist()


def test_scores_match_a_plain_forward_and_clip(tiny_model_and_processor, tiny_clip, tiny_recipe_dict, images):
    """Batched, right-padded R_T equals an independent forward to 1e-4 (float32 noise of a different batch
    shape); tokens are split into sentences here by decoding prefixes, not by offsets; R_I equals CLIP's."""
    model, processor = tiny_model_and_processor
    summed = ResponseRewardScorer(model, processor, tiny_clip, _recipe(tiny_recipe_dict,
                                                                        reward={"instruction_score": "sum"}))
    mean = ResponseRewardScorer(model, processor, tiny_clip, _recipe(tiny_recipe_dict))
    items = [ResponseItem(PROMPT, " A red circle. A blue square.", images[0]),
             ResponseItem(OTHER_PROMPT, " The green triangle is small", images[1]),  # other prompt length
             ResponseItem(PROMPT, " It is big.", images[2])]
    by_sum, by_mean = summed.score(items), mean.score(items)

    ids, logprobs = _plain_logprobs(model, processor, items[0].prompt_text, items[0].response_text,
                                    summed.image(images[0]))
    k = next(k for k in range(len(ids) + 1) if processor.tokenizer.decode(ids[:k]) == " A red circle.")
    assert [s["r_t"] for s in by_sum[0].sentences] == pytest.approx([sum(logprobs[:k]), sum(logprobs[k:])],
                                                                     abs=1e-4)
    assert [s["r_t"] for s in by_mean[0].sentences] == pytest.approx(
        [sum(logprobs[:k]) / k, sum(logprobs[k:]) / (len(ids) - k)], abs=1e-4)
    for item, scored in zip(items[1:], by_mean[1:]):
        _, logprobs = _plain_logprobs(model, processor, item.prompt_text, item.response_text, mean.image(item.image))
        assert scored.sentences[0]["r_t"] == pytest.approx(sum(logprobs) / len(logprobs), abs=1e-4)

    for item, scored in zip(items, by_mean):
        for sentence in scored.sentences:
            expected = tiny_clip.score([(item.image, mean.image(item.image), sentence["text"])])[0]
            assert sentence["r_i"] == pytest.approx(expected, abs=1e-4)
            assert sentence["reward"] == pytest.approx(0.9 * sentence["r_i"] + 0.1 * sentence["r_t"])
        assert scored.reward == pytest.approx(sum(s["reward"] for s in scored.sentences) / len(scored.sentences))


# ------------------------------------------------------------------ (c) reward_func, as OpenRLHF runs it
class FakeVLLM:
    """Stands in for vLLM's engine: answers every prompt with the same token ids."""

    def __init__(self, token_ids):
        self.token_ids = token_ids

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        assert multi_modal_data and multi_modal_data["image"], "the executor should pass the image to vLLM"
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(self.token_ids), text="",
                                                        finish_reason="stop", logprobs=None)])


def test_reward_func_through_openrlhf_executor(tmp_path, monkeypatch, tiny_recipe_dict, tiny_model_and_processor,
                                              tiny_clip, images):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    import csr_plugin.openrlhf.reward_func as reward_func_module

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe_dict))
    monkeypatch.setenv("CSR_RECIPE", str(recipe_path))
    monkeypatch.setenv("CSR_RECIPE_OVERRIDES", "reward.lambda=0.5")
    # train_ppo_ray splits --reward.remote_url on commas; the executor loads a .py endpoint by path.
    executor = SingleTurnAgentExecutor(remote_rm_url=[reward_func_module.__file__])
    model, processor = tiny_model_and_processor
    response = " A red circle. A blue square."
    response_ids = processor.tokenizer(response, add_special_tokens=False)["input_ids"]
    engine = FakeVLLM(response_ids + [processor.tokenizer.eos_token_id])
    label = json.dumps({"image": images[0]})

    output = asyncio.run(executor.execute(PROMPT, label, SimpleNamespace(max_tokens=32, logprobs=None), 256,
                                          processor, engine, images=[images[0]]))

    query = processor.tokenizer.decode(output["observation_tokens"], skip_special_tokens=False)
    assert not query.startswith(PROMPT) and query.endswith("</s>"), "the image placeholder was expanded"
    assert output["reward"] is not None, "the executor swallowed a reward_func error (see its log)"
    reference = ResponseRewardScorer(model, processor, tiny_clip, _recipe(tiny_recipe_dict, reward={"lambda": 0.5}))
    expected = reference.score([ResponseItem(PROMPT, response, images[0])])[0]
    assert float(output["reward"]) == pytest.approx(expected.reward, abs=1e-4)
    assert float(output["scores"]) == pytest.approx(expected.reward, abs=1e-4)
    assert float(output["extra_logs"]["r_i"]) == pytest.approx(expected.r_i, abs=1e-4)
    assert float(output["extra_logs"]["r_t"]) == pytest.approx(expected.r_t, abs=1e-4)
    # samples_generator._process_response_into_experience turns it into a one-element tensor
    assert torch.tensor([output["reward"]]).shape == (1,)


def test_reward_func_errors_name_the_fix(monkeypatch):
    import importlib.util

    import csr_plugin.openrlhf.reward_func as reward_func_module

    spec = importlib.util.spec_from_file_location("reward_func", reward_func_module.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    monkeypatch.delenv("CSR_RECIPE", raising=False)
    with pytest.raises(RuntimeError, match="CSR_RECIPE"):
        fresh.reward_func([PROMPT + " A."], [PROMPT], ["x.png"])


# ------------------------------------------------------------------ (d-f) the HTTP server
class WrappedScorer:
    """The real tiny scorer through the server's interface, recording every batch; ``gate`` holds batches
    until set, ``fail_on`` makes a batch holding that text raise."""

    def __init__(self, inner, gate=None, fail_on=None):
        self.inner, self.image, self.image_token = inner, inner.image, inner.image_token
        self.gate, self.fail_on = gate, fail_on
        self.batches: list[tuple[int, int]] = []  # (thread id, responses)
        self.entered = threading.Event()

    def score(self, items):
        self.batches.append((threading.get_ident(), len(items)))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail_on and any(self.fail_on in item.response_text for item in items):
            raise RuntimeError(f"cannot score {self.fail_on!r}")
        return self.inner.score(items)


def _post(port, body, path="/get_reward", timeout=60):
    """(status, JSON answer) of one request on a fresh loopback connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _request(image, response=" A red circle."):
    return {"query": [PROMPT + response], "prompts": [PROMPT], "labels": [json.dumps({"image": image})]}


@pytest.mark.timeout(600)
def test_server_under_load(scorer, images):
    """64 client threads, 10,000 one-response requests on kept-alive connections; the loop stops itself
    at its deadline. Figures (requests/s, p50/p99 latency) are printed; no wall-clock assert."""
    n_requests, n_clients, deadline = 10_000, 64, time.monotonic() + 400
    responses = [" A red circle.", " A blue square. It is big.", " Two shapes", " The green triangle is small."]
    wrapped = WrappedScorer(scorer)
    latencies, errors, lock, issued = [], [], threading.Lock(), [0]

    def client(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < deadline:
            with lock:
                i, issued[0] = issued[0], issued[0] + 1
            if i >= n_requests:
                break
            body = json.dumps(_request(images[i % len(images)], responses[i % len(responses)])).encode()
            started = time.perf_counter()
            try:
                conn.request("POST", "/get_reward", body, {"Content-Type": "application/json"})
                answer = conn.getresponse()
                data = json.loads(answer.read())
                ok = answer.status == 200 and len(data["rewards"]) == len(data["scores"]) == 1
            except Exception as exc:  # recorded, then a fresh connection
                data, ok = repr(exc), False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                latencies.append(time.perf_counter() - started)
                if not ok:
                    errors.append(data)
        conn.close()

    started = time.perf_counter()
    with RewardServer(wrapped, max_batch=64) as server:
        threads = [threading.Thread(target=client, args=(server.port,), daemon=True) for _ in range(n_clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic() + 70))
    elapsed = time.perf_counter() - started

    assert not any(thread.is_alive() for thread in threads), "a client thread did not stop"
    assert errors == [], errors[:3]
    assert len(latencies) == n_requests, f"only {len(latencies)} of {n_requests} requests before the deadline"
    sizes = [size for _, size in wrapped.batches]
    assert sum(sizes) == n_requests and max(sizes) <= 64
    assert len({thread_id for thread_id, _ in wrapped.batches}) == 1, "the model was used from two threads"
    latencies.sort()
    print(f"\n{n_requests} requests in {elapsed:.1f} s: {n_requests / elapsed:.0f} req/s, "
          f"p50 {1000 * latencies[len(latencies) // 2]:.0f} ms, p99 {1000 * latencies[int(0.99 * len(latencies))]:.0f}"
          f" ms, {len(sizes)} batches of mean {sum(sizes) / len(sizes):.1f} responses")
    assert len(sizes) < n_requests / 4, "requests were not batched together"


def test_server_through_openrlhf_executor(scorer, tiny_model_and_processor, images):
    """The executor's own HTTP client (aiohttp) posts and parses, as with --reward.remote_url http://..."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    _, processor = tiny_model_and_processor
    response = " A red circle. A blue square."
    engine = FakeVLLM(processor.tokenizer(response, add_special_tokens=False)["input_ids"]
                      + [processor.tokenizer.eos_token_id])
    with RewardServer(scorer) as server:
        executor = SingleTurnAgentExecutor(remote_rm_url=[f"http://127.0.0.1:{server.port}/get_reward"])
        output = asyncio.run(executor.execute(PROMPT, images[0], SimpleNamespace(max_tokens=32, logprobs=None),
                                              256, processor, engine, images=[images[0]]))
    expected = scorer.score([ResponseItem(PROMPT, response, images[0])])[0]
    assert output["reward"] == pytest.approx([expected.reward], abs=1e-4)
    assert output["scores"] == pytest.approx([expected.reward], abs=1e-4)
    assert output["extra_logs"] == {"r_i": pytest.approx([expected.r_i], abs=1e-4),
                                    "r_t": pytest.approx([expected.r_t], abs=1e-4)}


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(scorer, images, tmp_path):
    good = _request(images[0])
    cases = [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        ({"query": good["query"], "prompts": good["prompts"]}, 400),                      # labels missing
        ({**good, "query": good["query"][0]}, 400),                                       # not a list
        ({**good, "prompts": good["prompts"] * 2}, 400),                                  # lengths differ
        ({**good, "query": ["USER: something else"]}, 400),                               # not its prompt
        ({**good, "labels": [json.dumps({"image": str(tmp_path / "missing.png")})]}, 400),  # no such image
        ({**good, "labels": [json.dumps({"path": images[0]})]}, 400),                     # label without image
    ]
    with RewardServer(scorer) as server:
        for body, status in cases:
            got, answer = _post(server.port, body)
            assert (got, "error" in answer) == (status, True), (body, got, answer)
        assert _post(server.port, good, path="/nope")[0] == 404
        assert _get(server.port, "/nope")[0] == 404
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.putrequest("POST", "/get_reward")  # no Content-Length
        conn.endheaders()
        assert conn.getresponse().status == 411
        conn.close()
        assert _get(server.port, "/health") == (200, {"status": "ok", "queued": 0})
        status, answer = _post(server.port, good)
        assert status == 200 and len(answer["rewards"]) == 1 and set(answer["extra_logs"]) == {"r_i", "r_t"}


def _wait_until(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_full_queue_gives_503(scorer, images):
    gate = threading.Event()
    wrapped = WrappedScorer(scorer, gate=gate)
    results = []
    with RewardServer(wrapped, max_batch=1, max_queue=1) as server:
        send = lambda: results.append(_post(server.port, _request(images[0])))  # noqa: E731
        first = threading.Thread(target=send)
        first.start()
        assert wrapped.entered.wait(10)          # the worker holds request 1
        second = threading.Thread(target=send)
        second.start()
        _wait_until(lambda: _get(server.port, "/health")[1]["queued"] == 1)  # request 2 fills the queue
        status, answer = _post(server.port, _request(images[0]))
        gate.set()
        first.join(30)
        second.join(30)
    assert status == 503 and "queue full" in answer["error"]
    assert [s for s, _ in results] == [200, 200]


def test_timeout_gives_504_and_a_failed_batch_500(scorer, images):
    gate = threading.Event()
    with RewardServer(WrappedScorer(scorer, gate=gate), timeout_s=0.3) as server:
        status, answer = _post(server.port, _request(images[0]))
        gate.set()
        assert status == 504 and "not scored within" in answer["error"]
        assert _post(server.port, _request(images[0]))[0] == 200
    with RewardServer(WrappedScorer(scorer, fail_on="BOOM")) as server:
        status, answer = _post(server.port, _request(images[0], " BOOM."))
        assert status == 500 and "cannot score 'BOOM'" in answer["error"]
        assert _post(server.port, _request(images[0]))[0] == 200


def test_serve_binds_loopback_by_default_and_stops(scorer, tiny_recipe_dict, images, caplog):
    server = RewardServer(scorer)
    try:
        assert server.host == "127.0.0.1" and server.port > 0
    finally:
        server.stop()  # never started: closes the socket without waiting for a serve loop

    ready: queue.Queue = queue.Queue()
    # 30 s, the former default: below OpenRLHF's client timeout, which serve() warns about.
    thread = threading.Thread(target=serve, args=(_recipe(tiny_recipe_dict),),
                              kwargs={"ready": ready.put, "timeout_s": 30.0}, daemon=True)
    thread.start()
    served = ready.get(timeout=120)
    assert served.host == "127.0.0.1"
    assert any(r.levelno == logging.WARNING and "--timeout 30.0 s is not above OpenRLHF's 180.0 s" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert _post(served.port, _request(images[0]))[0] == 200
    served.stop()
    thread.join(30)
    assert not thread.is_alive(), "serve() did not return after stop()"


# ------------------------------------------------------------------ (g) limits: size, image paths, methods, leavers
class EchoScorer:
    """No model: a response's reward is its length in characters. Records every response it scores;
    ``gate`` holds each batch until set. Like the real loader, image() refuses a file that is not there."""

    image_token = "<image>"

    def __init__(self, gate=None):
        self.gate = gate
        self.scored: list[str] = []
        self.entered = threading.Event()

    def image(self, path):
        if not os.path.isfile(path):
            raise ValueError(f"image not found: {path}")

    def score(self, items):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(30)
        self.scored.extend(item.response_text for item in items)
        return [ScoredResponse(float(len(item.response_text)), []) for item in items]


@pytest.fixture
def image_file(tmp_path) -> str:
    path = tmp_path / "image.png"
    path.write_bytes(b"")  # EchoScorer only checks that it exists
    return str(path)


def _send_raw(port, headers, parts=()):
    """(status, JSON answer, Connection header) of a POST /get_reward sent as given: these headers, then
    these body parts, and nothing more; a server waiting for more body would time this out."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", "/get_reward", skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        for part in parts:
            conn.send(part)
        response = conn.getresponse()
        return response.status, json.loads(response.read()), response.getheader("Connection")
    finally:
        conn.close()


def _padded(body: dict, size: int) -> bytes:
    """``body`` as JSON of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    raw = json.dumps(body).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


@pytest.mark.timeout(120)
def test_bodies_over_the_limit_get_413_before_they_are_read(image_file):
    limit = 1024
    good = _request(image_file)
    with RewardServer(EchoScorer(), max_request_bytes=limit) as server:
        assert _post(server.port, _padded(good, limit))[0] == 200  # the limit itself is allowed
        status, answer = _post(server.port, _padded(good, limit + 1))
        assert status == 413 and "--max-request-bytes 1024" in answer["error"], answer
        # 60 MB declared and none of it sent: only an answer from the header alone comes back in time.
        status, answer, connection = _send_raw(server.port, {"Content-Length": str(60 << 20)})
        assert (status, connection) == (413, "close") and f"{60 << 20} bytes" in answer["error"], answer
        # A chunked body of unbounded length: four 512-byte chunks, no last chunk; cut once over 1024.
        chunk = b"200\r\n" + b" " * 512 + b"\r\n"
        status, answer, connection = _send_raw(server.port, {"Transfer-Encoding": "chunked"}, [chunk] * 4)
        read = re.search(r"more than (\d+) bytes", answer["error"])
        assert (status, connection) == (413, "close") and read and 1024 < int(read.group(1)) <= 2048, answer
        raw = json.dumps(good).encode()  # a complete chunked body under the limit is served
        status, answer, _ = _send_raw(server.port, {"Transfer-Encoding": "chunked"},
                                      [b"%x\r\n%s\r\n0\r\n\r\n" % (len(raw), raw)])
        assert status == 200 and answer["rewards"] == [len(" A red circle.")]


@pytest.mark.timeout(120)
def test_wrong_methods_get_405_naming_the_right_one(image_file):
    with RewardServer(EchoScorer()) as server:
        for method, path, allowed in (("GET", "/get_reward", "POST"), ("PUT", "/get_reward", "POST"),
                                      ("POST", "/health", "GET")):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request(method, path, b"{}" if method != "GET" else None)
            response = conn.getresponse()
            answer = json.loads(response.read())
            conn.close()
            assert response.status == 405, (method, path, response.status, answer)
            assert allowed in response.getheader("Allow") and f"method {method} not allowed" in answer["error"]
            assert "POST /get_reward" in answer["error"]
        assert _post(server.port, _request(image_file))[0] == 200


@pytest.mark.timeout(120)
def test_image_root_refuses_label_images_outside_it(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "elsewhere.png"
    (root / "sub").mkdir(parents=True)
    (root / "in.png").write_bytes(b"")
    outside.write_bytes(b"")
    (root / "link.png").symlink_to(outside)
    scorer = EchoScorer()
    with RewardServer(scorer, image_root=str(root)) as server:
        assert _post(server.port, _request(str(root / "in.png")))[0] == 200
        assert _post(server.port, _request(str(root / "sub" / ".." / "in.png")))[0] == 200  # '..' staying inside
        for path in (outside, root / "link.png", root / ".." / "elsewhere.png"):
            status, answer = _post(server.port, _request(str(path), " Outside."))
            assert status == 403, (path, status, answer)
            assert str(path) in answer["error"] and f"--image-root {root}" in answer["error"], answer
    assert scorer.scored == [" A red circle.", " A red circle."]
    with pytest.raises(ValueError, match="--image-root .*missing is not a directory"):
        RewardServer(EchoScorer(), image_root=str(tmp_path / "missing"))


@pytest.mark.timeout(120)
def test_a_request_whose_client_left_is_not_scored(image_file, caplog):
    caplog.set_level(logging.DEBUG, logger="csr_plugin.openrlhf.reward_server")
    gate = threading.Event()
    scorer = EchoScorer(gate=gate)
    with RewardServer(scorer, max_batch=1) as server:
        first = threading.Thread(target=_post, args=(server.port, _request(image_file, " First.")))
        first.start()
        assert scorer.entered.wait(10)  # the worker holds " First."
        leaver = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        leaver.request("POST", "/get_reward", json.dumps(_request(image_file, " Left.")).encode())
        _wait_until(lambda: _get(server.port, "/health")[1]["queued"] == 1)  # " Left." waits in the queue
        leaver.close()  # as OpenRLHF's client does when its timeout fires
        _wait_until(lambda: any("client left" in r.getMessage() for r in caplog.records))
        gate.set()
        first.join(30)
        assert _post(server.port, _request(image_file, " Last."))[0] == 200
    assert scorer.scored == [" First.", " Last."]


def test_defaults_outlast_openrlhfs_client_and_the_cli_says_them(capsys):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    from csr_plugin.cli import build_parser, main

    # The client figures our timeout and docs cite, read from the installed OpenRLHF.
    source = inspect.getsource(SingleTurnAgentExecutor._fetch_rewards_via_http)
    assert float(re.search(r"ClientTimeout\(total=(\d+)\)", source).group(1)) == OPENRLHF_CLIENT_TIMEOUT_S
    assert re.search(r"try_max_times=(\d+)", source).group(1) == "5"
    assert DEFAULT_TIMEOUT_S > OPENRLHF_CLIENT_TIMEOUT_S
    args = build_parser().parse_args(["serve-reward", "--config", "r.yaml"])
    assert (args.host, args.timeout, args.max_request_bytes, args.image_root) == \
        (None, DEFAULT_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES, None)   # the bind address: serve.host, 127.0.0.1
    with pytest.raises(SystemExit):
        main(["serve-reward", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"--max-request-bytes MAX_REQUEST_BYTES larger request bodies get a 413 before they are read " \
           f"(default: {DEFAULT_MAX_REQUEST_BYTES}" in help_text
    assert "--image-root DIR" in help_text and f"(default: {DEFAULT_TIMEOUT_S}, above OpenRLHF's 180 s" in help_text


@pytest.mark.timeout(120)
def test_uvicorn_logs_to_loggers_not_the_terminal(image_file, capfd, caplog):
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    with RewardServer(EchoScorer()) as server:
        assert _post(server.port, _request(image_file))[0] == 200
        assert _get(server.port, "/nope")[0] == 404
    assert capfd.readouterr() == ("", "")  # uvicorn's default config would print these lines
    assert [r.args[-1] for r in caplog.records if r.name == "uvicorn.access"] == [200, 404]


def test_fastapi_is_imported_only_to_serve(monkeypatch):
    code = ("import sys, csr_plugin.openrlhf.reward_server, csr_plugin.openrlhf.reward_func; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout.strip()) == (0, "[]"), run.stderr
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    with pytest.raises(ImportError, match=r"fastapi is not installed: pip install 'csr-plugin\[serve\]'"):
        RewardServer(EchoScorer())
