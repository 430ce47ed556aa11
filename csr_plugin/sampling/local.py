"""`csr sample`: prompts -> search trees, resumable, with bad inputs set aside.

Reads prompts JSONL ({id, image, question}; a relative image resolves against
the prompts file's folder), searches them in batches, and appends each finished
tree to ``<output_dir>/trees.jsonl``. A prompt that cannot be searched (missing
or corrupt image, empty question, prompt too long, an error inside the search)
goes to ``errors.jsonl`` with its reason and the run continues. Rerunning skips
finished ids and retries the failed ones. When ``search.stop_after_failures``
prompts in a row fail alike, the cause is the setup (an unsupported model, a
wrong image folder), not the prompts: the run stops with that error instead of
grinding through the rest.
"""
from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from csr_plugin.config import Recipe
from csr_plugin.jsonl import JsonlAppender
from csr_plugin.sampling.prompts import PromptError, PromptRecord, check_prompt, load_prompts
from csr_plugin.sampling.search import PromptJob, SentenceBeamSearch

log = logging.getLogger(__name__)


class SystematicFailure(RuntimeError):
    """Many prompts in a row failed with the same error: a setup problem, not bad prompts."""


def failure_kind(reason: str) -> str:
    """What makes two failures "the same": the error with its numbers blanked for a search failure
    (shapes and ids differ per prompt), the category before the first colon for a data error
    ("image not found: /a.png" and "image not found: /b.png" are alike)."""
    if reason.startswith(("search failed", "actor died")):
        return re.sub(r"\d+", "#", reason.split(" (after ")[0])
    return reason.split(":")[0]


class FailureStreak:
    """Counts prompts failing alike in a row and stops the run once ``limit`` do (0 = never).

    Granularity is a batch of results: a batch that produced any tree ends the streak, so a
    run that keeps producing trees is never stopped, whatever fraction of its prompts fail.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.kind, self.count, self.example = "", 0, ""

    def record(self, trees: int, errors: list[dict]) -> None:
        if trees:
            self.kind, self.count = "", 0
            return
        for error in errors:
            kind = failure_kind(error["reason"])
            if kind != self.kind:
                self.kind, self.count = kind, 0
            self.count += 1
            self.example = error["reason"]
        if self.limit and self.count >= self.limit:
            raise SystematicFailure(
                f"the last {self.count} prompts all failed alike, so the cause is the setup rather than the "
                f"prompts; stopping (trees written so far are kept, a rerun resumes). Error: {self.example}\n"
                f"Fix: {_fix_for(self.example)} Or set search.stop_after_failures=0 to set such prompts aside "
                "and go on.")


def _fix_for(reason: str) -> str:
    if reason.startswith("image not found"):
        return "check the image paths: relative paths resolve against the prompts file's folder."
    if reason.startswith("prompt too long"):
        return "raise the model's context or lower search.max_new_tokens, or shorten the questions."
    if reason.startswith(("search failed", "actor died")):
        return ("the model (model.path) or its family may not be supported by this engine; the full "
                "traceback of the first failure is in the log above. See docs/families.md.")
    return "see the error above."


@dataclass
class SampleSummary:
    done: int = 0
    resumed: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def __str__(self) -> str:
        lines = [f"sampled {self.done} prompts in {self.seconds:.1f}s; {self.resumed} already done; "
                 f"{sum(self.skipped.values())} skipped"]
        lines += [f"  skipped {count}: {reason}" for reason, count in self.skipped.most_common()]
        return "\n".join(lines)


def prepare_job(prompt: PromptRecord, engine) -> PromptJob:
    from csr_plugin.sampling.transformers_engine import PromptTooLongError

    image = check_prompt(prompt)
    try:
        encoded = engine.encode_prompt(prompt.question, image)
    except PromptTooLongError as exc:
        raise PromptError(f"prompt too long: {exc}") from None
    return PromptJob(prompt.id, prompt.image, prompt.question, image, encoded)


def build_engine(recipe: Recipe):
    if recipe.search.decoding == "pargs":   # config refuses it with engine: vllm
        from csr_plugin.sampling.pargs_engine import PargsEngine

        return PargsEngine.from_config(recipe.model, recipe.search)
    if recipe.search.engine == "vllm":
        from csr_plugin.sampling.vllm_engine import VllmEngine

        return VllmEngine.from_config(recipe.model, recipe.search)
    from csr_plugin.sampling.transformers_engine import TransformersEngine

    return TransformersEngine.from_config(recipe.model, recipe.search)


def build_clip(recipe: Recipe):
    """The visual term of the calibrated reward (``reward.source``: CLIP or the reward model's gain)."""
    from csr_plugin.reward.source import build_visual_scorer

    return build_visual_scorer(recipe)


class _ErrorLog:
    """errors.jsonl without repeats: an (id, reason) already logged is not written again."""

    def __init__(self, path: Path):
        self.file = JsonlAppender(path)
        self.logged = {(r.get("id"), r.get("reason")) for r in self.file.records}

    def add(self, record: dict, summary: SampleSummary) -> None:
        summary.skipped[record["reason"].split(":")[0]] += 1
        if (record["id"], record["reason"]) not in self.logged:
            self.logged.add((record["id"], record["reason"]))
            self.file.append(record)


class SampleOutputs:
    """A run's trees.jsonl and errors.jsonl opened for append, and the prompts not done yet.

    Shared by :func:`sample` and ``sample_on_ray`` so that both resume, skip and log alike.
    """

    def __init__(self, recipe: Recipe, summary: SampleSummary):
        out_dir = Path(recipe.output_dir)
        self.summary = summary
        prompts, bad_lines = load_prompts(recipe.data.prompts, recipe.data.limit)
        self.trees = JsonlAppender(out_dir / "trees.jsonl")
        if self.trees.repaired:
            log.warning("trees.jsonl ended in a torn line (a killed run); it was cut and that prompt is redone")
        self.errors = _ErrorLog(out_dir / "errors.jsonl")
        for record in bad_lines:
            self.errors.add(record, summary)
        done = {tree["id"] for tree in self.trees.records}
        self.todo = [p for p in prompts if p.id not in done]
        summary.resumed = len(prompts) - len(self.todo)
        self.streak = FailureStreak(recipe.search.stop_after_failures)

    def add(self, trees: list[dict], errors: list[dict]) -> None:
        """Write a batch's results; raises :class:`SystematicFailure` once prompts keep failing alike."""
        for tree in trees:
            self.trees.append(tree)
            self.summary.done += 1
        for record in errors:
            self.errors.add(record, self.summary)
        self.streak.record(len(trees), errors)

    def close(self) -> None:
        self.trees.close()
        self.errors.file.close()

    def __enter__(self) -> "SampleOutputs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chunks(prompts: list[PromptRecord], size: int) -> list[list[PromptRecord]]:
    return [prompts[start:start + size] for start in range(0, len(prompts), size)]


def search_prompts(search: SentenceBeamSearch, engine, prompts: list[PromptRecord],
                   logged: set[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Tree JSON for the prompts that could be searched, error records for the others.

    ``logged`` holds the failure kinds whose traceback was already logged (one per kind per run).
    """
    jobs, errors = [], []
    for prompt in prompts:
        try:
            jobs.append(prepare_job(prompt, engine))
        except PromptError as exc:
            errors.append({"id": prompt.id, "image": prompt.image, "reason": str(exc)})
    trees = _search_isolating_failures(search, jobs, errors, logged if logged is not None else set())
    return [tree.to_json() for tree in trees], errors


def sample(recipe: Recipe, engine=None, clip=None, progress: bool = True, leave: bool = True) -> SampleSummary:
    """Search the prompts not done yet; ``progress``: a tqdm bar, ``leave``: keep it once done."""
    started = time.monotonic()
    summary = SampleSummary()
    with SampleOutputs(recipe, summary) as outputs:
        if outputs.todo:
            clip = clip or build_clip(recipe)   # first: a bad reward.mrm fails before the VLM loads
            engine = engine or build_engine(recipe)
            search = SentenceBeamSearch(engine, clip, recipe.search, recipe.reward, recipe.curation)
            logged: set[str] = set()
            bar = tqdm(total=len(outputs.todo), desc="csr sample", unit="prompt", disable=not progress,
                       leave=leave)
            for chunk in chunks(outputs.todo, recipe.search.batch_prompts):
                outputs.add(*search_prompts(search, engine, chunk, logged))
                bar.update(len(chunk))
            bar.close()
    summary.seconds = time.monotonic() - started
    return summary


def _search_isolating_failures(search: SentenceBeamSearch, jobs: list[PromptJob], errors: list[dict],
                               logged: set[str]):
    """Search a batch; if it fails, search its prompts one by one so only the culprit is set aside.

    Said once: the batch's error and the prompts retried alone; a prompt's traceback only the
    first time its kind of failure is seen, then one line per prompt.
    """
    if not jobs:
        return []
    try:
        return search.run(jobs)
    except Exception as exc:  # noqa: BLE001 - one bad prompt must not end the run
        reason = f"search failed: {type(exc).__name__}: {exc}"
        if len(jobs) == 1:
            kind = failure_kind(reason)
            if kind in logged:
                log.warning("prompt %s: %s", jobs[0].id, reason)
            else:
                logged.add(kind)
                log.error("prompt %s: %s", jobs[0].id, reason, exc_info=exc)
            errors.append({"id": jobs[0].id, "image": jobs[0].image, "reason": reason})
            return []
        log.warning("a batch of %d prompts failed (%s: %s); searching them one by one to find the culprit: %s",
                    len(jobs), type(exc).__name__, exc, ", ".join(job.id for job in jobs))
    trees = []
    for job in jobs:
        trees.extend(_search_isolating_failures(search, [job], errors, logged))
    return trees
