"""Quiet by default: stage lines and results on the terminal, warnings, library logs and the DPO ranks'
output under <output_dir>/logs/; `csr --verbose` shows everything; a failing DPO shows its log's tail."""
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _csr(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "csr_plugin.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def _terminal_lines(stdout: str, stderr: str) -> list[str]:
    """What a person sees: progress-bar redraws (\\r) overwrite a line, they do not add one."""
    return [line.split("\r")[-1] for line in (stdout + stderr).splitlines() if line.split("\r")[-1].strip()]


def _recipe(tmp_path, tiny_recipe_dict, name):
    recipe = json.loads(json.dumps(tiny_recipe_dict))
    recipe["output_dir"] = str(tmp_path / name)
    recipe["search"].update({"batch_prompts": 3, "max_sentences": 2, "max_new_tokens": 8})
    recipe["dpo"] = {"nproc": 1, "batch": 2, "micro_batch": 1, "epochs": 1, "ckpt_steps": 0}
    recipe["data"]["limit"] = 2
    recipe["loop"] = {"iterations": 1}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, tmp_path / name


def test_quiet_run_prints_stages_and_routes_warnings_and_ranks_to_logs(tmp_path, tiny_recipe_dict):
    config, out = _recipe(tmp_path, tiny_recipe_dict, "quiet")
    code, stdout, stderr = _csr("run", "--config", config)
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    lines = _terminal_lines(stdout, stderr)
    assert len(lines) < 60, "\n".join(lines)
    assert "warn" not in (stdout + stderr).lower(), stdout + stderr
    assert stdout.splitlines()[0] == f"logs: {out / 'logs'}/"
    for stage in ("iteration 1: sampling 2 prompts ...", "iteration 1: sampled ", "iteration 1: curated ",
                  "iteration 1: DPO on "):
        assert stage in stdout, stdout
    logs = out / "logs"
    # the ranks' output: launcher and DPO trainer, none of it on the terminal
    rank_log = (logs / "dpo_iter1.log").read_text()
    assert "csr_plugin.training.dpo_main" in rank_log and "Train" in rank_log
    assert "Train" not in stdout + stderr
    csr_log = (logs / "csr.log").read_text()
    assert f"=== csr run --config {config}" in csr_log
    assert "iteration 1: curated" in csr_log            # stage markers among the libraries' messages
    assert (out / "iter_1" / "dpo" / "final" / ".complete").exists()


def test_failing_train_dpo_prints_the_rank_error_from_its_log(tmp_path, tiny_recipe_dict):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "p0", "images": [], "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    recipe = json.loads(json.dumps(tiny_recipe_dict))
    # a model folder that passes the up-front path checks (its config.json loads) but has no weights: the
    # rank fails loading it
    broken = tmp_path / "no-such-model"
    broken.mkdir()
    shutil.copyfile(Path(recipe["model"]["path"]) / "config.json", broken / "config.json")
    recipe["model"]["path"] = str(broken)
    recipe.update(output_dir=str(tmp_path / "out"),
                  dpo={"pairs": str(pairs), "nproc": 1, "batch": 1, "micro_batch": 1, "ckpt_steps": 0})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, stdout, stderr = _csr("train-dpo", "--config", tmp_path / "r.yaml")
    assert code != 0
    log_file = tmp_path / "out" / "logs" / "dpo.log"
    assert f"full log: {log_file}" in stderr, stderr
    assert "no-such-model" in log_file.read_text()
    tail = stderr.split("DPO exited with code")[1]
    assert "  | [rank0]: " in tail and "no-such-model" in tail    # the rank's error, not only the launcher's
    assert len(_terminal_lines(stdout, stderr)) < 40


@pytest.fixture
def restore_logging():
    root, ours = logging.getLogger(), logging.getLogger("csr_plugin")
    saved = (root.level, list(root.handlers), ours.level)
    yield
    for handler in [h for h in root.handlers if h not in saved[1]]:
        root.removeHandler(handler)
    root.setLevel(saved[0])
    ours.setLevel(saved[2])


@pytest.mark.parametrize("verbose", [True, False])
def test_train_dpo_ranks_on_the_terminal_only_with_verbose_and_quiet_mode_undone_after(
        verbose, tmp_path, tiny_recipe_dict, monkeypatch, capfd, restore_logging):
    import warnings

    from csr_plugin import cli, run_logs
    from csr_plugin.training import launch

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(launch, "worker_command",
                        lambda *a, **k: [sys.executable, "-c", "print('rank 0 says hello')"])
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    recipe = dict(tiny_recipe_dict, output_dir=str(tmp_path / "out"), dpo={"pairs": str(tmp_path / "pairs.jsonl")})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    root_handlers, showwarning = list(logging.getLogger().handlers), warnings.showwarning
    assert cli.main(["--verbose"] * verbose + ["train-dpo", "--config", str(tmp_path / "r.yaml")]) == 0
    out, err = capfd.readouterr()
    logs = tmp_path / "out" / "logs"
    if verbose:
        assert "rank 0 says hello" in out and "logs:" not in out and not logs.exists()
    else:
        assert "rank 0 says hello" not in out + err and out.startswith(f"logs: {logs}/")
        assert "rank 0 says hello" in (logs / "dpo.log").read_text()
    # main() leaves the process's logging as it found it
    assert not run_logs.is_quiet() and logging.getLogger().handlers == root_handlers
    assert warnings.showwarning is showwarning


def test_run_dpo_sends_the_ranks_to_the_log_file_or_the_terminal(tmp_path, tiny_recipe_dict, monkeypatch, capfd):
    from csr_plugin.config import recipe_from_dict
    from csr_plugin.training import launch

    monkeypatch.delenv("RANK", raising=False)
    script = ("import sys\nprint('rank 0 says hello')\nfor i in range(30): print('line', i)\n"
              "print('RuntimeError: rank 0 broke', file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setattr(launch, "worker_command", lambda *a, **k: [sys.executable, "-c", script])
    recipe = recipe_from_dict(tiny_recipe_dict)
    log_file = tmp_path / "logs" / "dpo_iter1.log"

    assert launch.run_dpo(recipe, "r.yaml", [], "m", "p.jsonl", "out", log_file=log_file) == 3
    out, err = capfd.readouterr()
    assert "says hello" not in out + err                       # the ranks' output is in the file ...
    assert "rank 0 says hello" in log_file.read_text()
    assert "RuntimeError: rank 0 broke" in err and f"full log: {log_file}" in err   # ... its tail on failure
    assert "line 29" in err and "line 5" not in err            # the last lines only

    assert launch.run_dpo(recipe, "r.yaml", [], "m", "p.jsonl", "out") == 3   # --verbose: the terminal
    out, err = capfd.readouterr()
    assert "rank 0 says hello" in out and "RuntimeError: rank 0 broke" in err and "full log" not in err


def test_routing_keeps_warnings_and_library_logs_off_the_terminal_but_not_errors(tmp_path):
    script = f"""
import logging, warnings
logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("csr_plugin").setLevel(logging.INFO)
from csr_plugin import run_logs
run_logs.quiet_terminal()
warnings.warn("early FutureWarning before the folder is known", FutureWarning)
run_logs.route_logs({str(tmp_path / 'out')!r})
run_logs.route_logs({str(tmp_path / 'out')!r})          # the folder is said once
logging.getLogger("DeepSpeed").warning("accelerator chatter")
logging.getLogger("some.library").info("library info")
logging.getLogger("some.library").warning("library warning")
logging.getLogger("csr_plugin.sampling").info("our info")
logging.getLogger("some.library").error("library error")
run_logs.say("iteration 1: a stage")
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"logs: {tmp_path / 'out' / 'logs'}/", "iteration 1: a stage"]
    assert proc.stderr.strip() == "ERROR some.library: library error"
    log = (tmp_path / "out" / "logs" / "csr.log").read_text()
    for text in ("early FutureWarning", "accelerator chatter", "library info", "library warning", "our info",
                 "library error", "iteration 1: a stage"):
        assert text in log, text


@pytest.mark.parametrize("argv", [["-v", "run", "--config", "r.yaml"], ["run", "-v", "--config", "r.yaml"],
                                  ["run", "--config", "r.yaml"]])
def test_verbose_flag_before_or_after_the_command(argv):
    from csr_plugin.cli import build_parser

    args = build_parser().parse_args(argv)
    assert args.verbose == ("-v" in argv) and args.quiet_logs


def test_quiet_eval_prints_progress_and_the_result_and_logs_the_rest(tmp_path, tiny_recipe_dict):
    from test_family_pipeline import _chain_world

    recipe = json.loads(json.dumps(tiny_recipe_dict))
    recipe["output_dir"] = str(tmp_path / "out")
    recipe["eval"] = {**_chain_world(tmp_path / "world"), "batch": 3, "max_new_tokens": 8, "pope_per_image": 1}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, stdout, stderr = _csr("eval", "--config", tmp_path / "r.yaml", "--out", tmp_path / "eval.json")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    lines = _terminal_lines(stdout, stderr)
    # the logs line, progress bars of the stages (CHAIR, 3 POPE settings) and the result: the CHAIR line,
    # POPE's table (header, 3 settings, mean F1) and where the result and the answers went, nothing else;
    # at most one line per bar state: CHAIR's 2 batches (0/2, 1/2, 2/2) and 3 x POPE's 4 (0/4 ... 4/4), all
    # of them on a loaded machine (tqdm drops an update only when the next one comes within 0.1 s)
    others = [line for line in lines if not re.match(r"(CHAIR|POPE (random|popular|adversarial)): +\d+%\|", line)]
    assert len(others) == 1 + 1 + 5 + 1 and len(lines) <= 8 + 3 + 3 * 5, "\n".join(lines)
    assert "warn" not in (stdout + stderr).lower() and "INFO" not in stdout + stderr, stdout + stderr
    out = stdout.splitlines()
    assert out[0] == f"logs: {tmp_path / 'out' / 'logs'}/"
    assert out[-7].startswith("CHAIR_s ") and out[-6].split()[:3] == ["POPE", "accuracy", "precision"]
    assert [line.split()[0] for line in out[-5:-2]] == ["random", "popular", "adversarial"]
    assert out[-2].startswith("POPE F1 (mean of 3) ")
    assert out[-1] == f"result: {tmp_path / 'eval.json'}; answers: {tmp_path / 'eval.answers.jsonl'}"
    log = (tmp_path / "out" / "logs" / "csr.log").read_text()
    assert "=== csr eval --config" in log and "Warning" in log   # the library warnings went there
    assert json.loads((tmp_path / "eval.json").read_text())["responses"] == 6
