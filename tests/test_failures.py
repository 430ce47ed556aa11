"""Failure handling of `csr sample`: said once, isolated, and a systematic failure stops the run early."""
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from csr_plugin.config import recipe_from_dict
from csr_plugin.jsonl import load_records
from csr_plugin.sampling.local import FailureStreak, SystematicFailure, failure_kind, sample
from csr_plugin.sampling.prompts import load_prompts
from fakes import ScriptedClip, ScriptedEngine


def _prompts(folder: Path, n: int, image=lambda i: f"{i}.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(folder / "0.png")
    lines = [json.dumps({"id": f"q{i}", "image": image(i), "question": f"question {i}"}) for i in range(n)]
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "prompts.jsonl"


def _recipe(prompts: Path, out: Path, **search) -> object:
    return recipe_from_dict({"model": {"path": "unused"}, "data": {"prompts": str(prompts)}, "output_dir": str(out),
                             "search": {"beam_width": 2, "candidates": 2, "keep_top": 1, "keep_bottom": 1,
                                        "max_sentences": 2, **search}})


class _Broken(ScriptedEngine):
    """Every expansion fails alike, as an unsupported architecture does."""

    def expand(self, requests):
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({len(requests) * 3}x64 and 128x64)")


def test_a_line_that_is_not_utf8_is_an_invalid_line_not_the_end_of_the_file(tmp_path):
    prompts = _prompts(tmp_path, 3, image=lambda i: "0.png")
    lines = prompts.read_bytes().splitlines()
    prompts.write_bytes(b"\n".join([lines[0], b'{"id": "bad", "question": "caf\xe9"}', lines[1], lines[2]]) + b"\n")
    records, errors = load_prompts(prompts)
    assert [r.id for r in records] == ["q0", "q1", "q2"]
    assert errors == [{"id": "line:2", "reason": "invalid line: line 2 is not valid UTF-8 (byte 0xe9 at column 31)"}]
    summary = sample(_recipe(prompts, tmp_path / "out"), ScriptedEngine(), ScriptedClip(), progress=False)
    assert summary.done == 3 and summary.skipped["invalid line"] == 1


def test_failure_kind_blanks_numbers_of_search_errors_and_keeps_the_category_of_data_errors():
    assert failure_kind("search failed: RuntimeError: shapes (12x64 and 128x64)") == \
        failure_kind("search failed: RuntimeError: shapes (9x64 and 128x64)")
    assert failure_kind("search failed: RuntimeError: a") != failure_kind("search failed: ValueError: a")
    assert failure_kind("image not found: /a.png") == failure_kind("image not found: /b/c.png") == "image not found"


def test_streak_stops_at_the_limit_and_only_for_failures_alike_with_no_tree_between():
    alike = [{"reason": "image not found: /x.png"}]
    streak = FailureStreak(3)
    streak.record(0, alike * 2)
    streak.record(1, alike * 5)           # a batch that produced a tree ends the streak
    streak.record(0, alike * 2)
    streak.record(0, [{"reason": "empty question: give it one"}])   # another kind starts over
    streak.record(0, alike * 2)
    with pytest.raises(SystematicFailure, match="last 3 prompts all failed alike.*image not found"):
        streak.record(0, alike)
    FailureStreak(0).record(0, alike * 100)   # 0 = never stop


def test_every_prompt_failing_alike_stops_the_run_early_with_the_cause(tmp_path, caplog):
    prompts = _prompts(tmp_path, 40, image=lambda i: "0.png")
    recipe = _recipe(prompts, tmp_path / "out", batch_prompts=4, stop_after_failures=6)
    engine = _Broken()
    with caplog.at_level(logging.WARNING, logger="csr_plugin"):
        with pytest.raises(SystematicFailure, match="mat1 and mat2 shapes") as info:
            sample(recipe, engine, ScriptedClip(), progress=False)
    assert "search.stop_after_failures=0" in str(info.value)
    errors = load_records(tmp_path / "out" / "errors.jsonl")
    # two batches of 4 (each tried whole, then prompt by prompt) reach 6 failures alike: 8 recorded, 32 untouched
    assert [e["id"] for e in errors] == [f"q{i}" for i in range(8)]
    batch_lines = [r for r in caplog.records if "searching them one by one" in r.getMessage()]
    assert len(batch_lines) == 2 and "q0, q1, q2, q3" in batch_lines[0].getMessage()
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, "the traceback of a kind of failure is logged once, not per prompt"


def test_missing_images_everywhere_stop_the_run_and_name_the_fix(tmp_path):
    prompts = _prompts(tmp_path, 30, image=lambda i: f"elsewhere/{i}.png")
    with pytest.raises(SystematicFailure, match="(?s)image not found.*relative paths resolve against"):
        sample(_recipe(prompts, tmp_path / "out", batch_prompts=5), ScriptedEngine(), ScriptedClip(),
               progress=False)
    assert len(load_records(tmp_path / "out" / "errors.jsonl")) == 10


def test_cli_reports_a_systematic_failure_and_exits_1(tmp_path, capsys, monkeypatch):
    from csr_plugin import cli

    prompts = _prompts(tmp_path, 12, image=lambda i: f"elsewhere/{i}.png")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"model": {"path": "unused"}, "data": {"prompts": str(prompts)},
                                  "output_dir": str(tmp_path / "out")}))
    monkeypatch.setattr("csr_plugin.sampling.local.build_engine", lambda recipe: ScriptedEngine())
    monkeypatch.setattr("csr_plugin.sampling.local.build_clip", lambda recipe: ScriptedClip())
    # the up-front path checks would refuse these prompts first (tests/test_recipe_paths.py): this is the
    # net behind them, for failures no path check sees (an unsupported model, images gone mid-run)
    monkeypatch.setattr(cli, "check_recipe_paths", lambda *args, **kwargs: None)
    assert cli.main(["sample", "--config", str(recipe), "--quiet"]) == 1
    assert "csr sample: stopped: the last 12 prompts all failed alike" in capsys.readouterr().err
