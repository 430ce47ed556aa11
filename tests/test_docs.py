"""The docs stay true by test: README.md and docs/*.md

- every `csr ...` command parses against the CLI (a fenced one in full, an inline one may leave out required
  arguments but not misspell a command, a flag or a value), and its overrides load with the recipe it names;
- every recipe key they name exists (an OpenRLHF flag of the same spelling counts as that flag);
- every repository file or folder they cite exists, and so does every file code and scripts cite;
- every measured figure names the command it came from and the machine it ran on.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from csr_plugin.cli import _leaf_parsers, build_parser
from csr_plugin.config import ConfigError, Recipe, field_key, load_recipe, parse_override

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SPAN = re.compile(r"`([^`\n]+)`")


def _doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------- commands

def commands(text: str) -> list[tuple[int, str, bool]]:
    """(line, command, fenced) of every `csr ...` in ``text``: code spans, and lines of fenced blocks
    (continued with a trailing backslash)."""
    found, fence, pending = [], False, None
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence, pending = not fence, None
            continue
        if fence:
            stripped = re.sub(r"\s+#.*$", "", line.strip())   # a trailing comment
            if pending is not None:
                pending[1] += " " + stripped.rstrip("\\").strip()
                if not stripped.endswith("\\"):
                    found.append(tuple(pending) + (True,))
                    pending = None
            elif stripped.startswith("csr "):
                if stripped.endswith("\\"):
                    pending = [number, stripped.rstrip("\\").strip()]
                else:
                    found.append((number, stripped, True))
            continue
        for match in SPAN.finditer(line):
            if match.group(1).startswith("csr "):
                found.append((number, re.sub(r"\s+#.*$", "", match.group(1)), False))
    return found


def _words(command: str) -> list[str]:
    """The command's words, a synopsis' optional [groups] and <placeholders> left out, a one-letter
    placeholder value (N, S, T) read as 1."""
    command = re.sub(r"(?<![=\w])\[[^\]]*\]", " ", command)
    words = []
    for word in shlex.split(command)[1:]:
        if word == "..." or re.fullmatch(r"<[^>]*>", word):
            continue
        words.append("1" if re.fullmatch(r"[A-Z]", word) else word)
    return words


class _ParseError(Exception):
    pass


def _parse(words: list[str]) -> argparse.Namespace:
    parser = build_parser()

    def error(message):   # every parser, subcommands included: an exception, not an exit
        raise _ParseError(message)
    for p in [parser, *_leaf_parsers(parser)]:
        p.error = error
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                child.error = error
                for sub in child._actions:
                    if isinstance(sub, argparse._SubParsersAction):
                        for grandchild in sub.choices.values():
                            grandchild.error = error
    return parser.parse_args(words)


def _command_problems(command: str, fenced: bool) -> list[str]:
    words = _words(command)
    try:
        args = _parse(words)
    except _ParseError as exc:
        # an inline mention (`csr eval --rm`) may leave out what is required and a last flag's value;
        # nothing else
        mention = "the following arguments are required" in str(exc) or (
            "expected one argument" in str(exc) and words and words[-1].startswith("--"))
        if fenced or not mention:
            return [f"does not parse: {exc}"]
        return []
    except SystemExit:   # --help
        return []
    problems = []
    overrides = getattr(args, "overrides", []) or []
    for override in overrides:
        try:
            parts, _ = parse_override(override)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if not recipe_key_exists(".".join(parts)):
            problems.append(f"override {override!r}: no recipe key {'.'.join(parts)!r}")
    config = getattr(args, "config", None) or getattr(args, "recipe", None)
    if config and (ROOT / config).is_file() and not problems:
        try:
            load_recipe(ROOT / config, overrides)
        except ConfigError as exc:
            problems.append(f"{config} with these overrides: {exc}")
    return problems


def test_the_command_scan_finds_commands():
    found = [c for doc in DOCS for c in commands(doc.read_text())]
    assert len(found) > 100 and any(fenced for *_, fenced in found)
    assert _words("csr demo [--seed N] --seed S <overrides> ...") == ["demo", "--seed", "1"]


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_every_csr_command_parses(doc):
    problems = [f"{_doc_id(doc)}:{line}: `{command}`: {problem}"
                for line, command, fenced in commands(doc.read_text())
                for problem in _command_problems(command, fenced)]
    assert not problems, "\n".join(problems)


def test_a_wrong_command_is_caught():
    assert _command_problems("csr smaple --config recipes/toy.yaml", False)
    assert _command_problems("csr recipe show recipes/toy.yaml --chek", False)
    assert _command_problems("csr demo --seed x", False)
    assert _command_problems("csr run --config recipes/toy.yaml dpo.bta=1", True)
    assert _command_problems("csr run --config recipes/toy.yaml dpo.beta=-1", True)   # loaded with the recipe
    assert _command_problems("csr eval --rm", True)   # fenced: copy-paste commands are complete
    assert not _command_problems("csr eval --rm", False)


# ---------------------------------------------------------------- recipe keys

def _recipe_keys() -> tuple[set[str], set[str]]:
    """(every key, the keys whose value is a free mapping: dpo.openrlhf, search.vllm, ...)."""
    keys, free = set(), set()

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            key = prefix + field_key(f.name)
            keys.add(key)
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif isinstance(value, dict):
                free.add(key)
    walk(Recipe(), "")
    return keys, free


KEYS, FREE = _recipe_keys()
SECTIONS = {k for k in KEYS if "." not in k and k not in ("output_dir",)}


def recipe_key_exists(key: str) -> bool:
    return key in KEYS or any(key.startswith(f + ".") for f in FREE)


OPENRLHF = Path(importlib.util.find_spec("openrlhf").origin).parent


def _openrlhf_names() -> set[str]:
    """The flags of OpenRLHF's train_dpo and train_ppo_ray, read from their source (importing train_ppo_ray
    needs vLLM): some share a prefix with a recipe section (`model.beta`, `eval.steps`), and the docs name
    them as flags."""
    flags = set()
    for entry in ("train_dpo.py", "train_ppo_ray.py"):
        flags |= set(re.findall(r'add_argument\(\s*"--([\w.]+)"', (OPENRLHF / "cli" / entry).read_text()))
    assert len(flags) > 100, "OpenRLHF's flags were not found in its source"
    return flags


# Python names in code spans that read like keys of the `model:` section
PYTHON_NAMES = {"model.generate", "model.model"}


KEY_SPAN = re.compile(r"(?<![-\w.])((?:%s)\.[a-z_][a-z0-9_.]*[a-z0-9_])" % "|".join(sorted(SECTIONS)))


def named_keys(text: str) -> list[tuple[int, str]]:
    """(line, key) of every dotted recipe key in a code span (not a --flag, not a file name)."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for span in SPAN.findall(line):
            if span.startswith(("csr ", "python", "ray ", "torchrun", "deepspeed")):
                continue   # commands: their overrides are checked with the command
            for match in KEY_SPAN.finditer(span):
                key = match.group(1)
                if re.search(r"\.(py|md|json|jsonl|yaml|png|txt|log|pt)$", key):
                    continue
                found.append((number, key))
    return found


def test_every_named_recipe_key_exists():
    openrlhf = _openrlhf_names()
    problems = [f"{_doc_id(doc)}:{line}: `{key}` is no recipe key"
                for doc in DOCS for line, key in named_keys(doc.read_text())
                if not recipe_key_exists(key) and key not in openrlhf and key not in PYTHON_NAMES]
    assert not problems, "\n".join(problems)


def test_a_wrong_key_is_caught():
    assert named_keys("set `dpo.bta: 0.2` and `search.beam_width`") == [(1, "dpo.bta"), (1, "search.beam_width")]
    assert not recipe_key_exists("dpo.bta") and recipe_key_exists("dpo.openrlhf.ds.adam_offload")


# ---------------------------------------------------------------- cited files

TOP = ("csr_plugin", "recipes", "docs", "tests", "scripts", "benchmarks")
PACKAGES = tuple(p.name for p in (ROOT / "csr_plugin").iterdir() if p.is_dir() and (p / "__init__.py").exists())
REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w/]|[\w-]+\.md|[\w/]+\.py|[\w-]+\.sh|Makefile)(?![\w-])"
                       % "|".join(TOP + PACKAGES))
# Not files of this repository: what `csr train-ppo --prepare-only` writes into the Ray working_dir, a
# placeholder, and scripts of other projects the docs name with their project.
NOT_REPO = {"csr_agent.py": "the Ray working_dir's agent file", "csr_reward_func.py": "the working_dir's reward file",
            "file.py": "a placeholder", "score.py": "the official CSR code's scorer",
            "convert_llava_weights_to_hf.py": "transformers' source tree"}


def _resolves(path: str, base: Path) -> bool:
    path = path.split("#")[0].rstrip("/")
    if not path:
        return True
    # an OpenRLHF file (`openrlhf/utils/agent.py`, `cli/train_ppo_ray.py`): in the installed OpenRLHF
    candidates = [base / path, ROOT / path, ROOT / "csr_plugin" / path, ROOT / "docs" / path,
                  OPENRLHF.parent / path, OPENRLHF / path]
    if "/" not in path and path.endswith(".py"):   # a module named by its file: somewhere in the package
        return any(ROOT.joinpath("csr_plugin").rglob(path)) or any(ROOT.joinpath("scripts").glob(path)) \
            or any(ROOT.joinpath("tests").glob(path)) or any(ROOT.joinpath("benchmarks").glob(path))
    return any(c.exists() for c in candidates)


def cited_paths(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):   # markdown links
            if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
                found.append((number, target))
        for span in SPAN.findall(line):
            for match in REPO_PATH.finditer(span):
                found.append((number, match.group(1)))
    return found


def test_every_cited_repository_file_exists():
    problems = [f"{_doc_id(doc)}:{line}: {path} is not in the repository"
                for doc in DOCS for line, path in cited_paths(doc.read_text())
                if Path(path).name not in NOT_REPO and not _resolves(path, doc.parent)]
    assert not problems, "\n".join(problems)


CODE = [*sorted((ROOT / "csr_plugin").rglob("*.py")), *sorted((ROOT / "scripts").glob("*")),
        *sorted((ROOT / "recipes").glob("*.yaml")), *sorted((ROOT / "benchmarks").glob("*.py")), ROOT / "Makefile"]
DOC_NAME = re.compile(r"(?<![\w/.-])((?:docs/)?[\w-]+\.md)\b")


def test_code_cites_only_docs_that_exist():
    problems = [f"{path.relative_to(ROOT)}:{number}: cites {name}, not in the repository"
                for path in CODE if path.is_file()
                for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
                for name in DOC_NAME.findall(line)
                if not (ROOT / name).exists() and not (ROOT / "docs" / name).exists()]
    assert not problems, "\n".join(problems)


def test_a_missing_file_is_caught():
    assert cited_paths("see [x](docs/nope.md) and `csr_plugin/nope.py`") == [(1, "docs/nope.md"),
                                                                             (1, "csr_plugin/nope.py")]
    assert not _resolves("docs/nope.md", ROOT) and _resolves("training/device.py", ROOT / "docs")


# ---------------------------------------------------------------- figures

# A measured figure: a change in percent (−55%, 35% faster), a share of something (28% of the trees), a spread
# (58% ± 10%), a duration (342 s, 16 min) or a speed-up (10.3x). A setting (3% warm-up) is not one.
FIGURE = re.compile(r"[−+-]\s?\d+(\.\d+)?\s?%|\d%\s+(of|faster|slower|more|less|fewer)\b|\d\s?%?\s?(±|\+-)\s?\d"
                    r"|\b\d+(\.\d+)?\s?(s|min|minutes|seconds|hours?|h)\b(?!\w)|\b\d+(\.\d+)?x\b")
COMMAND = re.compile(r"`(OMP_NUM_THREADS=\d+ )?(csr |make |python|pytest|\.venv/bin/|bash |ray |torchrun|deepspeed)"
                     r"|^\s*(\w+=\S+\s+)*(\.venv/bin/)?(csr|make|python3?|pytest|ray|torchrun|deepspeed|bash)\s"
                     r"|Command:|commands? (above|below)|same (command|run)", re.M)
MACHINE = re.compile(r"machine|\bcores?\b|\bCPUs?\b|\bGPUs?\b|H100|H200|A100|laptop|\bhere\b", re.I)
# Figures that are not measurements: the paper's, a config value, a spec.
NOT_MEASURED = re.compile(r"^\s*(paper|the paper|official)", re.I)


def blocks(text: str) -> list[tuple[int, str, str]]:
    """(first line, block, context) per paragraph or table outside code fences; a block's context is the
    block itself plus the paragraph before it and the section heading it sits under (a table's
    caption, a section's "Command:" line)."""
    out, current, start, fence, heading, previous, section_lines = [], [], 0, False, "", "", []
    lines = text.splitlines() + [""]
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fence = not fence
            section_lines.append(line)
            continue
        if fence:
            section_lines.append(line)
            continue
        if line.startswith("#"):
            heading, section_lines = line, []
        if line.strip() and not line.startswith("#"):
            if not current:
                start = number
            current.append(line)
            continue
        if current:
            block = "\n".join(current)
            out.append((start, block, "\n".join([heading, previous, block, "\n".join(section_lines)])))
            previous = block
            section_lines.append(block)
            current = []
    return out


def unsourced_figures(text: str) -> list[tuple[int, str]]:
    problems = []
    for start, block, context in blocks(text):
        if not FIGURE.search(block) or NOT_MEASURED.search(block):
            continue
        if not (COMMAND.search(context) and MACHINE.search(context)):
            problems.append((start, block.splitlines()[0][:100]))
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=_doc_id)
def test_every_figure_names_its_command_and_machine(doc):
    problems = [f"{_doc_id(doc)}:{line}: a figure with no command or no machine nearby: {first}"
                for line, first in unsourced_figures(doc.read_text())]
    assert not problems, "\n".join(problems)


def test_a_bare_figure_is_caught():
    assert unsourced_figures("## Speed\n\nSampling got 35% faster.\n") == [(3, "Sampling got 35% faster.")]
    assert not unsourced_figures("## Speed\n\nSampling got 35% faster (`csr sample`, this 2-core machine).\n")
