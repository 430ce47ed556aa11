import json
import subprocess
import sys
from pathlib import Path

import yaml

from csr_plugin.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent


def test_help_lists_every_subcommand_with_a_description():
    out = subprocess.run([sys.executable, "-m", "csr_plugin.cli", "--help"], capture_output=True, text=True,
                         cwd=REPO).stdout
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    listed = {action.dest: action.help for action in sub._choices_actions}
    assert set(listed) == set(sub.choices)
    for name, description in listed.items():
        assert description and len(description) < 100, f"`{name}` needs a one-line description"
        assert name in out and description.split()[0] in out


def test_bad_recipe_exits_2_with_the_key_named(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "m"}, "reward": {"lambda": 2}}))
    assert main(["sample", "--config", str(path)]) == 2
    assert "`reward.lambda` must be in [0, 1], got 2.0" in capsys.readouterr().err


def test_sample_then_curate_end_to_end(tmp_path, tiny_recipe_dict, capsys):
    recipe = json.loads(json.dumps(tiny_recipe_dict))
    recipe["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["sample", "--config", str(path), "--quiet", "search.max_sentences=2"]) == 0
    assert "sampled 6 prompts" in capsys.readouterr().out
    trees = [json.loads(line) for line in (tmp_path / "out" / "trees.jsonl").read_text().splitlines()]
    assert len(trees) == 6 and all(tree["nodes"][0]["parent"] is None for tree in trees)
    node_keys = {"id", "parent", "text", "token_ids", "logprobs", "r_t", "r_i", "reward", "final"}
    assert all(node_keys <= set(n) for tree in trees for n in tree["nodes"])
    assert main(["curate", "--trees", str(tmp_path / "out" / "trees.jsonl"), "--out", str(tmp_path / "p.jsonl"),
                 "--config", str(path)]) == 0
    assert "curated" in capsys.readouterr().out
    pairs = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_reward"] >= p["rejected_reward"] for p in pairs)
