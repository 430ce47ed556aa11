"""Sampled token ids travel from the search tree to the pairs, the DPO batches and the reward scorer.

Two tokenizers: tiny LLaVA's SentencePiece-style one ("▁" word pieces, as LLaVA-1.5's
LLaMA tokenizer) and Qwen2-VL's byte-level BPE. The text of a pair is stripped
(curation joins sentences), so re-tokenizing it, apart from or with the prompt,
cannot give back what the model sampled: LLaVA samples "▁There" after "ASSISTANT:",
the text tokenizes there as "The" "re".
"""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from csr_plugin.config import CurationConfig
from csr_plugin.curation import curate_file
from csr_plugin.toy.tiny_families import build_tiny_family
from csr_plugin.training.data import MultimodalPreferenceDataset, load_processor

CHOSEN, REJECTED = " There is a red circle.", " A blue square is big."


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("token_exact")
    return {f: build_tiny_family(f, root / f) for f in ("llava", "qwen2_vl")}


def _node(i, parent, ids, tokenizer, finish, final, reward):
    return {"id": i, "parent": parent, "text": tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids,
            "logprobs": [-1.0] * len(ids), "r_t": -1.0, "r_i": 10.0, "reward": reward, "final": final,
            "finish": finish}


def _tree_file(folder: Path, tokenizer, chosen_ids, rejected_ids, rejected_finish="max_sentences") -> Path:
    image = folder / "img.png"
    Image.new("RGB", (48, 48), (200, 30, 30)).save(image)
    root = {"id": 0, "parent": None, "text": "", "token_ids": [], "logprobs": [], "r_t": 0.0, "r_i": 0.0,
            "reward": 0.0, "final": False, "finish": ""}
    tree = {"id": "t0", "image": str(image), "prompt": "Describe the image.",
            "nodes": [root, _node(1, 0, chosen_ids, tokenizer, "eos", True, 30.0),
                      _node(2, 0, rejected_ids, tokenizer, rejected_finish, True, 5.0)]}
    trees = folder / "trees.jsonl"
    trees.write_text(json.dumps(tree) + "\n")
    return trees


def _sampled(tokenizer, case: str) -> list[int]:
    """What a model may sample for CHOSEN: after its prompt, the response starts with a space (" There")
    or, as the chat template writes it right after "ASSISTANT:", without ("The" "re" in SentencePiece)."""
    if case == "no_space":
        return tokenizer.convert_tokens_to_ids(["The", "re"]) + \
            tokenizer(" is a red circle.", add_special_tokens=False)["input_ids"]
    return tokenizer(CHOSEN, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family,case", [("llava", "space"), ("llava", "no_space"), ("qwen2_vl", "space")])
def test_pairs_carry_the_sampled_ids_and_training_uses_them(family, case, families, tmp_path):
    processor = load_processor(str(families[family]))
    tokenizer = processor.tokenizer
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    chosen_ids, rejected_ids = _sampled(tokenizer, case) + [eos], encode(REJECTED)  # the rejected beam was cut
    summary = curate_file(_tree_file(tmp_path, tokenizer, chosen_ids, rejected_ids), tmp_path / "pairs.jsonl",
                          CurationConfig())
    assert summary.pairs == 1
    pair = json.loads((tmp_path / "pairs.jsonl").read_text())
    assert pair["chosen_token_ids"] == chosen_ids and pair["rejected_token_ids"] == rejected_ids
    assert (pair["chosen_finish"], pair["rejected_finish"]) == ("eos", "max_sentences")
    assert pair["chosen"][0]["content"][0]["text"] == CHOSEN.strip()

    item = MultimodalPreferenceDataset(str(tmp_path / "pairs.jsonl"), processor, 512)[0]
    assert item["chosen_ids"] == chosen_ids                 # verbatim, the EOS the model sampled included
    assert item["rejected_ids"] == rejected_ids             # cut by max_sentences: trained without EOS
    assert item["chosen_ids"].count(eos) == 1
    chosen, _, _, _, prompts = MultimodalPreferenceDataset(str(tmp_path / "pairs.jsonl"), processor,
                                                           512).collate_fn([item])
    assert chosen[0].tolist() == item["prompt_ids"] + chosen_ids and prompts.lengths == [len(item["prompt_ids"])]

    # The same pair as text only (a pairs file from before token ids): tokenized with its prompt
    # (as the chat template writes it) or apart (as before), the stored text need not give back
    # the sampled ids, down to the first token.
    text_only = {k: v for k, v in pair.items() if not k.endswith(("_token_ids", "_finish"))}
    (tmp_path / "text.jsonl").write_text(json.dumps(text_only) + "\n")
    together = MultimodalPreferenceDataset(str(tmp_path / "text.jsonl"), processor, 512)[0]
    apart = encode(" " + CHOSEN.strip())
    assert together["prompt_ids"] == item["prompt_ids"]
    first = lambda ids: tokenizer.convert_ids_to_tokens(ids[:1])  # noqa: E731
    if (family, case) == ("llava", "space"):
        assert first(chosen_ids) == ["▁There"] and first(together["chosen_ids"]) == ["The"]
    elif (family, case) == ("llava", "no_space"):
        assert together["chosen_ids"] == chosen_ids         # the template's own segmentation was sampled
        assert first(chosen_ids) == ["The"] and first(apart) == ["▁There"]
    else:   # byte-level BPE: the stripped text loses the leading space the model sampled
        assert first(chosen_ids) == ["Ġ"] and first(together["chosen_ids"]) == ["There"]

    # Text with its finish: the response a limit cut gets no end of turn on the text path either.
    with_finish = {k: v for k, v in pair.items() if not k.endswith("_token_ids")}
    (tmp_path / "finish.jsonl").write_text(json.dumps(with_finish) + "\n")
    text_item = MultimodalPreferenceDataset(str(tmp_path / "finish.jsonl"), processor, 512)[0]
    assert text_item["chosen_ids"][-1] == eos   # the template's end of turn (LLaVA: </s>, Qwen: <|im_end|>)
    assert not set(text_item["rejected_ids"]) & set(tokenizer.all_special_ids)


def test_a_blank_eos_child_gets_the_end_of_turn_id(families, tmp_path):
    """The search marks a parent final when a child is only EOS; the kept ids lack it."""
    processor = load_processor(str(families["qwen2_vl"]))
    tokenizer = processor.tokenizer
    ids = tokenizer(CHOSEN, add_special_tokens=False)["input_ids"]
    other = tokenizer(REJECTED, add_special_tokens=False)["input_ids"]
    curate_file(_tree_file(tmp_path, tokenizer, ids, other, rejected_finish="context"), tmp_path / "p.jsonl",
                CurationConfig())
    item = MultimodalPreferenceDataset(str(tmp_path / "p.jsonl"), processor, 512)[0]
    assert item["chosen_ids"] == ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert item["rejected_ids"] == other


def test_a_response_curation_stopped_gets_the_end_of_turn_id(families, tmp_path):
    """With curation.stop_at_any_sentence a response may end after a sentence the model went on from:
    it is trained as a decision to stop there (end of turn appended), unlike a limit cut, unless
    curation.stop_with_eos is false."""
    processor = load_processor(str(families["qwen2_vl"]))
    tokenizer = processor.tokenizer
    first = tokenizer(" There is a red circle.", add_special_tokens=False)["input_ids"]
    second = tokenizer(" There is a blue square.", add_special_tokens=False)["input_ids"]
    root = {"id": 0, "parent": None, "text": "", "token_ids": [], "logprobs": [], "r_t": 0.0, "r_i": 0.0,
            "reward": 0.0, "final": False, "finish": ""}
    nodes = [root, _node(1, 0, first, tokenizer, "sentence", False, 30.0),        # grounded, continued
             _node(2, 1, second, tokenizer, "max_sentences", True, 1.0),       # then a hallucination
             _node(3, 0, second, tokenizer, "max_sentences", True, 2.0)]
    (tmp_path / "trees.jsonl").write_text(json.dumps({"id": "t", "image": str(tmp_path / "x.png"),
                                                      "prompt": "Describe.", "nodes": nodes}) + "\n")
    cfg = CurationConfig(length_normalize=False, reward_baseline="prompt_mean", stop_at_any_sentence=True)
    curate_file(tmp_path / "trees.jsonl", tmp_path / "p.jsonl", cfg)
    pair = json.loads((tmp_path / "p.jsonl").read_text())
    assert (pair["chosen_finish"], pair["chosen_token_ids"]) == ("stop", first)
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    item = MultimodalPreferenceDataset(str(tmp_path / "p.jsonl"), processor, 512)[0]
    assert item["chosen_ids"] == first + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert item["rejected_ids"] == second                    # max_sentences: no end of turn
    # curation.stop_with_eos false: the cut is trained like a limit, what was said without a decision to stop
    cfg.stop_with_eos = False
    curate_file(tmp_path / "trees.jsonl", tmp_path / "cut.jsonl", cfg)
    pair = json.loads((tmp_path / "cut.jsonl").read_text())
    assert (pair["chosen_finish"], pair["chosen_token_ids"]) == ("cut", first)
    item = MultimodalPreferenceDataset(str(tmp_path / "cut.jsonl"), processor, 512)[0]
    assert item["chosen_ids"] == first and item["rejected_ids"] == second


def test_dpo_log_probs_of_sampled_pairs_are_the_samplers(families, tmp_path):
    """Real sampling on the SentencePiece model: the ids DPO trains on get, under a plain forward, exactly
    the log-probs the search recorded and scored (fp32, 1e-4)."""
    from transformers import AutoModelForImageTextToText

    from csr_plugin.config import RewardConfig, SearchConfig
    from csr_plugin.sampling.search import PromptJob, SentenceBeamSearch
    from csr_plugin.sampling.transformers_engine import TransformersEngine
    from fakes import ScriptedClip

    path = families["llava"]
    processor = load_processor(str(path))
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    search_cfg = SearchConfig(beam_width=3, candidates=3, keep_top=1, keep_bottom=2, max_sentences=2,
                              max_new_tokens=8, seed=1)
    engine = TransformersEngine(model, processor, search_cfg)
    jobs = []
    for i, question in enumerate(("Describe the image.", "What do you see?")):
        image_path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), (60 * i, 200, 30)).save(image_path)
        image = Image.open(image_path).convert("RGB")
        jobs.append(PromptJob(f"q{i}", str(image_path), question, image, engine.encode_prompt(question, image)))
    trees = SentenceBeamSearch(engine, ScriptedClip(), search_cfg, RewardConfig(), CurationConfig()).run(jobs)
    (tmp_path / "trees.jsonl").write_text("".join(json.dumps(t.to_json()) + "\n" for t in trees))
    assert curate_file(tmp_path / "trees.jsonl", tmp_path / "pairs.jsonl", CurationConfig()).pairs == 2

    dataset = MultimodalPreferenceDataset(str(tmp_path / "pairs.jsonl"), processor, 512)
    checked = 0
    for index in range(len(dataset)):
        record, item = dataset._record(index), dataset[index]
        tree = next(t for t in trees if t.id == record["id"])
        assert item["prompt_ids"] == engine.encode_prompt(tree.prompt, jobs[0].image_data).token_ids
        for key in ("chosen", "rejected"):
            sampled = record[f"{key}_token_ids"]
            # the recorded log-probs of the response's nodes, root to leaf
            leaf = next(n for n in tree.nodes if n.final and n.token_ids and
                        [t for n2 in _path(tree, n) for t in n2.token_ids] == sampled)
            recorded = [lp for n in _path(tree, leaf) for lp in n.logprobs]
            assert item[f"{key}_ids"][:len(sampled)] == sampled
            ids = torch.tensor([item["prompt_ids"] + sampled])
            image_inputs = dataset.encode(record)["image_inputs"]
            with torch.no_grad():
                logits = model(input_ids=ids, **image_inputs).logits[0].float()
            start = len(item["prompt_ids"])
            got = logits[start - 1:-1].log_softmax(-1).gather(-1, torch.tensor(sampled)[:, None]).squeeze(-1)
            assert got.tolist() == pytest.approx(recorded, abs=1e-4)
            checked += 1
    assert checked == 4


def _path(tree, node):
    by_id = {n.id: n for n in tree.nodes}
    out = []
    while node.parent is not None:
        out.append(node)
        node = by_id[node.parent]
    return out[::-1]


def test_the_reward_scorer_scores_the_sampled_ids(families, tmp_path):
    """Given ids, R_T is the mean log-prob of exactly those ids (a plain forward), not of a re-tokenization."""
    from transformers import AutoModelForImageTextToText

    from csr_plugin.config import recipe_from_dict
    from csr_plugin.multimodal import chat_prompt
    from csr_plugin.openrlhf.response_reward import ResponseItem, ResponseRewardScorer
    from fakes import ScriptedClip

    path = families["llava"]
    processor = load_processor(str(path))
    tokenizer = processor.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    recipe = recipe_from_dict({"model": {"path": str(path)}, "output_dir": str(tmp_path),
                               "reward": {"lambda": 0.0}, "search": {"delimiters": ["."]}})
    scorer = ResponseRewardScorer(model, processor, ScriptedClip(), recipe)
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    prompt = chat_prompt(processor, "Describe the image.")
    first = _sampled(tokenizer, "no_space")   # "The" "re" ...: the text re-tokenizes as "▁There" ...
    second = tokenizer(" It is big.", add_special_tokens=False)["input_ids"]
    ids = first + second + [tokenizer.eos_token_id]
    by_ids, by_text = scorer.score([ResponseItem(prompt, "", str(image), tuple(ids)),
                                    ResponseItem(prompt, "There is a red circle. It is big.", str(image))])
    assert [s["text"] for s in by_ids.sentences] == ["There is a red circle.", "It is big."]

    prompt_ids = processor(images=Image.open(image).convert("RGB"), text=prompt, add_special_tokens=False,
                           return_tensors="pt")
    image_inputs = {k: v for k, v in prompt_ids.items() if k not in ("input_ids", "attention_mask")}
    prompt_ids = prompt_ids["input_ids"][0].tolist()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + ids]), **image_inputs).logits[0].float()
    logp = logits[len(prompt_ids) - 1:-1].log_softmax(-1).gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)
    expected = [logp[:len(first)].mean().item(), logp[len(first):len(first) + len(second)].mean().item()]
    assert [s["r_t"] for s in by_ids.sentences] == pytest.approx(expected, abs=1e-4)   # lambda 0: reward = R_T
    assert by_text.sentences[0]["r_t"] != pytest.approx(expected[0], abs=1e-4)           # "▁There": other ids
