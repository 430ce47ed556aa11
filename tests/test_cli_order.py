"""Every subcommand takes its flags, positionals and `key.sub=value` overrides in any order, and `-v` before
or after the command (issue: `csr recipe show R --check k=v` and `csr curate ... -v` were refused)."""
import itertools

import pytest

from csr_plugin.cli import _leaf_parsers, build_parser
from test_quiet import restore_logging  # noqa: F401 - fixture: cli.main sets up logging

# Per command: the words that name it, then units (a flag with its value, a positional, an override) that
# may come in any order. Positionals keep their order among themselves (recipe before its overrides).
CASES = {
    "sample": (["sample"], [["--config", "r.yaml"], ["--quiet"], ["--actors", "3"], ["a.b=1"], ["c.d=2"]]),
    "curate": (["curate"], [["--trees", "t.jsonl"], ["--out", "p.jsonl"], ["--config", "r.yaml"], ["a.b=1"]]),
    "train-dpo": (["train-dpo"], [["--config", "r.yaml"], ["a.b=1"], ["c.d=2"]]),
    "train-rm": (["train-rm"], [["--config", "r.yaml"], ["--pairs", "p.jsonl"], ["a.b=1"]]),
    "run": (["run"], [["--config", "r.yaml"], ["a.b=1"], ["c.d=2"]]),
    "eval": (["eval"], [["--config", "r.yaml"], ["--responses", "x.jsonl"], ["a.b=1"], ["--out", "o.json"]]),
    "prepare coco": (["prepare", "coco"], [["--annotations", "a"], ["--images", "i"], ["--out", "o"]]),
    "prepare holdout": (["prepare", "holdout"], [["--prompts", "p.jsonl"], ["--out", "o"], ["--count", "5"]]),
    "serve-reward": (["serve-reward"], [["--config", "r.yaml"], ["--port", "1"], ["a.b=1"]]),
    "demo": (["demo"], [["--seed", "1"], ["--quick"], ["a.b=1"]]),
    "train-ppo": (["train-ppo"], [["--config", "r.yaml"], ["--prepare-only"], ["a.b=1"]]),
    "doctor": (["doctor"], []),
    "recipe show": (["recipe", "show"], [["r.yaml"], ["--check"], ["a.b=1"], ["c.d=2"]]),
    "recipe flags": (["recipe", "flags"], []),
}


def test_every_command_has_a_case():
    assert {leaf.prog.removeprefix("csr ") for leaf in _leaf_parsers(build_parser())} == set(CASES)


def _orders(units):
    positionals = [u for u in units if not u[0].startswith("-")]
    for order in itertools.permutations(units):
        if [u for u in order if not u[0].startswith("-")] == positionals:
            yield [word for unit in order for word in unit]


@pytest.mark.parametrize("command", CASES)
def test_flags_and_overrides_in_any_order_and_verbose_before_or_after(command):
    words, units = CASES[command]
    parser = build_parser()
    expected = vars(parser.parse_args(words + [w for u in units for w in u]))
    assert expected["verbose"] is False
    seen = 0
    for argv in _orders(units):
        assert vars(parser.parse_args(words + argv)) == expected, argv
        # before the command, between its words (`csr recipe -v show`), after them, at the end
        for verbose in (["-v", *words, *argv], [*words[:1], "-v", *words[1:], *argv], [*words, "--verbose", *argv],
                        [*words, *argv, "-v"]):
            assert vars(parser.parse_args(verbose)) == {**expected, "verbose": True}, verbose
        seen += 1
    assert seen >= 1


def test_missing_recipe_names_only_the_recipe(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["recipe", "show", "--check"])
    err = capsys.readouterr().err
    assert "required: recipe" in err and "key.sub=value\n" not in err.split("error:")[1]


def test_demo_build_only_builds_the_toy_models_and_runs_nothing(monkeypatch, tmp_path, capsys, restore_logging):
    from csr_plugin import cli
    from csr_plugin.toy import demo

    built = []
    monkeypatch.setattr(demo, "prepare_toy", lambda root, seed, size: built.append((root, seed, size)) or
                        tmp_path / f"seed{seed}")
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: pytest.fail("--build-only ran the CSR iterations"))
    assert cli.main(["demo", "--build-only", "--seed", "3", "--output", str(tmp_path / "out")]) == 0
    # the folder the toy recipes name (.cache/toy/seed0/vlm for seed 0)
    assert built == [(".cache/toy", 3, "full")] and f"{tmp_path / 'seed3'}/" in capsys.readouterr().out
