"""Pair diagnostics: why a CSR iteration's pairs should (or should not) be trusted.

Without ground truth (any recipe) they describe the search and the pairs:

- ``r_i_spread`` / ``r_t_spread``: mean over expansions of max - min of R_I / R_T among the
  sibling candidates of one beam. No R_I spread means CLIP cannot tell the candidates apart.
- ``best_r_i_not_best_r_t``: share of expansions whose best-R_I candidate is not the best-R_T
  one, i.e. how often calibration changes the choice the model's own score would make.
- chosen / rejected length (sentences, tokens) and fluency (mean token log-prob): a pair
  that differs mostly in fluency or length teaches fluency or length, not grounding.
- ``margin_p10/p50/p90``: the calibrated reward margin's spread over the pairs.

With a truth file (``{id, objects}``) and an object vocabulary they also say what the pairs
teach about hallucination: CHAIR_i of the chosen and of the rejected responses, the share
of clean chosen responses, the share of *informative* pairs (chosen clean, rejected
hallucinating), the share of expansions that had at least one *clean* candidate (a sentence
naming objects, all of them present), and mean R_I of grounded vs hallucinated sentences.

A tree whose prompt asks about one object (``yes_no_question``, a regex with an ``object`` group,
as ``reward.claim_question``) is judged on the answer instead: a candidate starting with yes or no
is *right* when it agrees with the truth, so for those pairs "clean" means right and an
informative pair is a right chosen answer over a wrong rejected one. "Yes." names no object, and
without this every yes/no pair would read as clean-vs-clean, not informative, whatever it taught.
A reply to such a question that starts with neither yes nor no ("right.", "YesNo.") is a *fragment*:
never clean, and ``diag_{chosen,rejected}_fragments`` is its share of that side's yes/no replies.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Optional

from csr_plugin.eval.objects import ObjectVocabulary
from csr_plugin.jsonl import load_records
from csr_plugin.reward.yes_no import ANSWER
from csr_plugin.sampling.search import record_path

log = logging.getLogger(__name__)


def _quantile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def _responses(tree: dict) -> dict[tuple, tuple[float, int]]:
    """Token ids of the response ending at each node -> (mean token log-prob, sentences)."""
    nodes = {n["id"]: n for n in tree["nodes"]}
    out = {}
    for node in tree["nodes"]:
        path = record_path(nodes, node)
        if path:
            logprobs = [lp for n in path for lp in n["logprobs"]]
            out[tuple(t for n in path for t in n["token_ids"])] = (sum(logprobs) / max(len(logprobs), 1), len(path))
    return out


def _asked(tree: dict, question: re.Pattern | None, vocab: ObjectVocabulary | None) -> str | None:
    """The canonical object a yes/no question asks about, or None for any other prompt."""
    found = question.search(tree.get("prompt") or "") if question is not None else None
    named = vocab.mentions(found.group("object")) if found else []
    return named[0] if len(named) == 1 else None


def _answer_right(text: str, asked: str, objects: set) -> bool | None:
    """A yes/no answer's agreement with the truth; None when ``text`` is not a yes/no answer."""
    answer = ANSWER.match(text)
    return None if answer is None else (answer.group(1).lower() == "yes") == (asked in objects)


def pair_diagnostics(trees_path: str | Path, pairs_path: str | Path, truth_path: str = "",
                     vocabulary_path: str = "", yes_no_question: str = "") -> dict:
    """Diagnostics of one iteration; ground-truth ones only when both files are given and cover the ids."""
    trees = {t["id"]: t for t in load_records(trees_path)}
    pairs = load_records(pairs_path)
    go_on = [p for p in pairs if p.get("kind") == "go_on"]   # curation.go_on_pairs: reported on their own
    pairs = [p for p in pairs if p.get("kind") != "go_on"]
    truth, vocab = {}, None
    if truth_path:
        missing = [f"{name} {path!r}" for name, path in (("data.truth", truth_path), ("eval.vocabulary",
                   vocabulary_path)) if not path or not Path(path).is_file()]
        if missing:   # the search-only figures still come; say why the others do not
            log.warning("pair diagnostics without ground truth: %s not found (set both to a file)",
                        " and ".join(missing))
        else:
            truth = {str(r["id"]): set(r["objects"]) for r in load_records(truth_path) if "objects" in r}
            vocab = ObjectVocabulary.from_json(vocabulary_path)
    question = re.compile(yes_no_question, re.IGNORECASE) if yes_no_question and truth else None   # truth: vocab too
    asked = {str(t["id"]): _asked(t, question, vocab) for t in trees.values()}

    r_i_spread, r_t_spread, disagree = [], [], []
    clean_expansion, grounded_r_i, hallucinated_r_i, no_object_r_i = [], [], [], []
    yes_no_right_r_i, yes_no_wrong_r_i = [], []
    for tree in trees.values():
        objects = truth.get(str(tree["id"]))
        asked_here = asked[str(tree["id"])] if objects is not None else None
        siblings: dict[int, list[dict]] = {}
        grounded: set[int] = set()   # ids of sentences naming objects, all of them present
        for node in tree["nodes"]:
            if node["parent"] is None:
                continue
            siblings.setdefault(node["parent"], []).append(node)
            right = _answer_right(node["text"], asked_here, objects) if asked_here else None
            if right is not None:   # a yes/no answer: right or wrong, not grounded or hallucinated
                if right:
                    grounded.add(node["id"])
                (yes_no_right_r_i if right else yes_no_wrong_r_i).append(node["r_i"])
            elif objects is not None:
                mentioned = set(vocab.mentions(node["text"]))
                if mentioned and mentioned <= objects:
                    grounded.add(node["id"])
                bucket = (no_object_r_i if not mentioned else
                          grounded_r_i if node["id"] in grounded else hallucinated_r_i)
                bucket.append(node["r_i"])
        for group in siblings.values():
            if len(group) < 2:
                continue
            r_i_spread.append(max(n["r_i"] for n in group) - min(n["r_i"] for n in group))
            r_t_spread.append(max(n["r_t"] for n in group) - min(n["r_t"] for n in group))
            disagree.append(max(group, key=lambda n: n["r_i"]) is not max(group, key=lambda n: n["r_t"]))
            if objects is not None:
                clean_expansion.append(any(n["id"] in grounded for n in group))

    sides = {"chosen": [], "rejected": []}
    responses = {}
    for pair in pairs:
        tree = trees.get(pair["id"])
        if tree is not None and pair["id"] not in responses:
            responses[pair["id"]] = _responses(tree)
        for side in sides:
            ids = pair.get(f"{side}_token_ids")
            found = responses.get(pair["id"], {}).get(tuple(ids)) if ids is not None else None
            sides[side].append({"text": pair[side][0]["content"][0]["text"],
                                "tokens": len(ids) if ids is not None else None,
                                "fluency": found[0] if found else None, "sentences": found[1] if found else None})

    margins = [p["chosen_reward"] - p["rejected_reward"] for p in pairs]
    out = {
        "diag_r_i_spread": _mean(r_i_spread), "diag_r_t_spread": _mean(r_t_spread),
        "diag_best_r_i_not_best_r_t": _mean(map(float, disagree)),
        "diag_margin_p10": _quantile(margins, 0.1), "diag_margin_p50": _quantile(margins, 0.5),
        "diag_margin_p90": _quantile(margins, 0.9),
    }
    if go_on:
        out["diag_go_on_pairs"] = len(go_on) / max(len(pairs), 1)   # per best-worst pair
    for side, rows in sides.items():
        out[f"diag_{side}_tokens"] = _mean(r["tokens"] for r in rows if r["tokens"] is not None)
        out[f"diag_{side}_sentences"] = _mean(r["sentences"] for r in rows if r["sentences"] is not None)
        out[f"diag_{side}_fluency"] = _mean(r["fluency"] for r in rows if r["fluency"] is not None)
    known = [i for i, p in enumerate(pairs) if str(p["id"]) in truth]
    if vocab is not None and known:
        verdicts = {}
        for side, rows in sides.items():
            mentions = hallucinated = 0
            clean, answers, fragments = [], [], []
            for i in known:
                pid = str(pairs[i]["id"])
                right = _answer_right(rows[i]["text"], asked[pid], truth[pid]) if asked.get(pid) else None
                if asked.get(pid):
                    fragments.append(right is None)
                if right is not None:
                    answers.append(right)
                    clean.append(right)
                    continue
                if asked.get(pid):   # a fragment: no answer is not a clean one, whatever objects it names
                    clean.append(False)
                    continue
                mentioned = vocab.mentions(rows[i]["text"])
                wrong = [m for m in mentioned if m not in truth[pid]]
                mentions, hallucinated = mentions + len(mentioned), hallucinated + len(wrong)
                clean.append(not wrong)
            verdicts[side] = clean
            out[f"diag_{side}_chair_i"] = hallucinated / mentions if mentions else 0.0
            out[f"diag_{side}_clean"] = _mean(map(float, clean))
            if answers:   # share of this side's yes/no answers that agree with the truth
                out[f"diag_yes_no_{side}_right"] = _mean(map(float, answers))
            if fragments:
                out[f"diag_{side}_fragments"] = _mean(map(float, fragments))
        judged = sum(1 for i in known if asked.get(str(pairs[i]["id"])))
        if judged:
            out["diag_yes_no_pairs"] = judged / len(known)
        out["diag_informative_pairs"] = _mean(
            float(c and not r) for c, r in zip(verdicts["chosen"], verdicts["rejected"]))
        out["diag_clean_expansions"] = _mean(map(float, clean_expansion))
        out["diag_r_i_grounded"] = _mean(grounded_r_i)
        out["diag_r_i_hallucinated"] = _mean(hallucinated_r_i)
        out["diag_r_i_no_object"] = _mean(no_object_r_i)
        if yes_no_right_r_i or yes_no_wrong_r_i:
            out["diag_r_i_yes_no_right"] = _mean(yes_no_right_r_i)
            out["diag_r_i_yes_no_wrong"] = _mean(yes_no_wrong_r_i)
        out["diag_truth_coverage"] = len(known) / len(pairs)
        if go_on:   # is what the go-on pairs' chosen side adds after the cut really there?
            out["diag_go_on_clean"] = _mean(float(not [m for m in vocab.mentions(p["chosen"][0]["content"][0]["text"])
                                                       if m not in truth[str(p["id"])]])
                                            for p in go_on if str(p["id"]) in truth)
    return out


def describe(diag: dict) -> str:
    """The few diagnostics a person reads first, on one line."""
    def f(key, spec=".2f"):
        value = diag.get(key)
        return "-" if value is None else format(value, spec)

    line = (f"R_I spread {f('diag_r_i_spread', '.1f')}, best R_I != best R_T {f('diag_best_r_i_not_best_r_t', '.0%')}, "
            f"fluency chosen/rejected {f('diag_chosen_fluency')}/{f('diag_rejected_fluency')}")
    if "diag_informative_pairs" in diag:
        line += (f"; CHAIR_i chosen/rejected {f('diag_chosen_chair_i')}/{f('diag_rejected_chair_i')}, "
                 f"informative pairs {f('diag_informative_pairs', '.0%')}, "
                 f"clean expansions {f('diag_clean_expansions', '.0%')}")
    if "diag_yes_no_pairs" in diag:
        line += (f"; yes/no pairs {f('diag_yes_no_pairs', '.0%')}, right chosen/rejected "
                 f"{f('diag_yes_no_chosen_right', '.0%')}/{f('diag_yes_no_rejected_right', '.0%')}, fragments "
                 f"chosen/rejected {f('diag_chosen_fragments', '.0%')}/{f('diag_rejected_fragments', '.0%')}")
    return line

