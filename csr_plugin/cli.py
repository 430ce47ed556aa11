"""The `csr` command."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from csr_plugin.config import ConfigError, load_recipe
from csr_plugin.doctor import GpuUnusable, preflight
from csr_plugin.recipe_paths import LoadFailure, check_recipe_paths


def _cmd_sample(args: argparse.Namespace) -> int:
    import json

    from csr_plugin.sampling.local import sample

    if args.actors < 1:
        raise ConfigError(f"--actors must be >= 1, got {args.actors}.")
    if (args.ray_address or args.openrlhf) and not args.ray:
        raise ConfigError("--ray-address and --openrlhf need --ray (without it `csr sample` runs here, serially).")
    # --rm: PARGS candidates with this reward model, as the overrides would set it (validated with the rest)
    recipe = load_recipe(args.config, args.overrides + ([f"search.rm={json.dumps(args.rm)}", "search.decoding=pargs"]
                                                        if args.rm else []))
    _route_logs(recipe.output_dir)
    preflight("sample")
    check_recipe_paths(recipe, "sample")   # model, CLIP, prompts and their images before anything loads
    if args.ray:
        from csr_plugin.sampling.ray_driver import sample_on_ray

        summary = sample_on_ray(recipe, args.actors, args.ray_address, progress=not args.quiet,
                                openrlhf_engines=args.openrlhf)
    else:
        summary = sample(recipe, progress=not args.quiet)
    print(summary)
    print(f"trees: {Path(recipe.output_dir) / 'trees.jsonl'}   errors: {Path(recipe.output_dir) / 'errors.jsonl'}")
    # Bad prompts are set aside, but a run where every new prompt failed points at the setup, not the data.
    return 1 if summary.done == 0 and summary.skipped and not summary.resumed else 0


def _cmd_curate(args: argparse.Namespace) -> int:
    from csr_plugin.config import CurationConfig
    from csr_plugin.curation import curate_file

    control_ids = frozenset()
    if args.config:
        from csr_plugin.multimodal import model_control_token_ids

        recipe = load_recipe(args.config, args.overrides)
        cfg, control_ids = recipe.curation, model_control_token_ids(recipe.model)
    else:
        cfg = CurationConfig(min_margin=args.min_margin, length_normalize=not args.sum)
    summary = curate_file(args.trees, args.out, cfg, control_ids)
    print(summary)
    return 0


def _cmd_train_dpo(args: argparse.Namespace) -> int:
    from csr_plugin.training.launch import run_dpo

    recipe = load_recipe(args.config, args.overrides)
    if not recipe.dpo.pairs:
        raise ConfigError("`dpo.pairs` is required: the pairs JSONL written by `csr curate`.")
    if not Path(recipe.dpo.pairs).is_file():
        raise FileNotFoundError(f"dpo.pairs {recipe.dpo.pairs!r} not found; run `csr curate` first.")
    from csr_plugin.run_logs import subprocess_log

    _route_logs(recipe.output_dir)
    preflight("train-dpo")
    check_recipe_paths(recipe, "train-dpo")
    log_file = subprocess_log(recipe.output_dir, "dpo")   # None with --verbose: the ranks print here
    if log_file is not None:
        print(f"DPO of {recipe.model.path} on {recipe.dpo.pairs} ...  ranks' log: {log_file}", flush=True)
    code = run_dpo(recipe, args.config, args.overrides, recipe.model.path, recipe.dpo.pairs, recipe.output_dir,
                   log_file=log_file)
    if code == 0:
        print(f"trained model: {Path(recipe.output_dir) / 'final'}")
    return code


def _cmd_train_rm(args: argparse.Namespace) -> int:
    from csr_plugin.reward_model.launch import run_rm
    from csr_plugin.run_logs import subprocess_log

    recipe = load_recipe(args.config, args.overrides)
    pairs, out = args.pairs or recipe.rm.pairs, args.out or recipe.output_dir
    if not pairs:
        raise ConfigError("`rm.pairs` (or --pairs) is required: preference pairs JSONL, e.g. from `csr curate`.")
    if not Path(pairs).is_file():
        raise FileNotFoundError(f"reward model pairs {pairs!r} not found; set rm.pairs or --pairs to a pairs JSONL.")
    _route_logs(out)
    preflight("train-rm")
    check_recipe_paths(recipe, "train-rm")
    log_file = subprocess_log(out, "rm")   # None with --verbose: the ranks print here
    if log_file is not None:
        print(f"reward model on {recipe.model.path}, pairs {pairs} ...  ranks' log: {log_file}", flush=True)
    code = run_rm(recipe, args.config, args.overrides, recipe.model.path, pairs, out, log_file=log_file)
    if code == 0:
        print(f"reward model: {Path(out) / 'final'}   metrics: {Path(out) / 'rm_metrics.jsonl'}")
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    from csr_plugin.pipeline import run, summary_table

    recipe = load_recipe(args.config, args.overrides)
    _route_logs(recipe.output_dir)
    preflight("run")   # before sampling, not hours later when DPO starts
    check_recipe_paths(recipe, "run")   # the eval files and dpo.sft_data too, not after the first iteration
    rows = run(args.config, args.overrides)
    print(summary_table(rows))
    return 0


def _cmd_serve_reward(args: argparse.Namespace) -> int:
    from csr_plugin.openrlhf.reward_server import serve

    from csr_plugin.openrlhf.reward_server import remote_url

    recipe = load_recipe(args.config, args.overrides)
    check_recipe_paths(recipe, "serve-reward")
    host = args.host if args.host is not None else recipe.serve.host
    port = args.port if args.port is not None else recipe.serve.port

    def ready(server) -> None:
        url = remote_url(server.host, server.port, recipe.serve.url_host)
        local = server.host in ("127.0.0.1", "localhost", "::1")
        print(f"CSR reward server on {server.host}:{server.port}; OpenRLHF: --reward.remote_url {url}"
              + (" (this machine only: serve.host=0.0.0.0 for engines on other nodes)" if local else ""), flush=True)

    serve(recipe, host, port, args.max_batch, args.max_queue, args.timeout, args.max_request_bytes,
          args.image_root, ready=ready)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from csr_plugin.toy.demo import prepare_toy, run_demo

    _route_logs(args.output)
    if args.build_only:   # what the toy recipes (toy-ppo.yaml, ...) point at, without the CSR iterations
        print(f"toy world, seed {args.seed}: building or loading the world and its tiny models ...", flush=True)
        print(f"toy world and models: {prepare_toy('.cache/toy', args.seed, 'quick' if args.quick else 'full')}/")
        return 0
    run_demo(args.output, args.seed, args.iterations, args.lambda_, args.config, extra=args.overrides,
             size="quick" if args.quick else "full")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from csr_plugin.eval.evaluate import evaluate, result_lines

    # --rm: PARGS decoding with this reward model, as the overrides would set it (validated with the rest)
    recipe = load_recipe(args.config, args.overrides + ([f"eval.rm={json.dumps(args.rm)}", "eval.decoding=pargs"]
                                                        if args.rm else []))
    out = Path(args.out) if args.out else None
    if args.responses:
        from csr_plugin.eval.responses import parse_response_arg, score_responses

        if args.model or args.rm:
            raise ConfigError("--responses scores answers already written: drop --model / --rm, no model is loaded.")
        check_recipe_paths(recipe, "eval", responses=True)
        try:
            result = score_responses(recipe.eval, [parse_response_arg(r) for r in args.responses])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if result["skipped"]:
            first = result["skipped"][0]
            print(f"skipped {len(result['skipped'])} answers (listed under 'skipped' in --out), first: "
                  f"{first.get('file', first.get('setting'))}:{first.get('line', first.get('question_id'))}: "
                  f"{first['reason']}")
    else:
        if not recipe.eval.prompts:
            raise ConfigError("`eval.prompts`, `eval.truth` and `eval.vocabulary` are needed for `csr eval`: "
                              "`csr prepare coco` writes them for COCO (docs/evaluation.md); "
                              "or score existing answers with --responses FILE.")
        _route_logs(recipe.output_dir)
        preflight("eval")
        check_recipe_paths(recipe, "eval", model=args.model)
        model = dataclasses.replace(recipe.model, path=args.model or recipe.model.path)
        try:
            result = evaluate(model, recipe.eval, answers_path=out.with_suffix(".answers.jsonl") if out else None)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    print("\n".join(result_lines(result)))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"result: {out}" + ("" if args.responses else f"; answers: {out.with_suffix('.answers.jsonl')}"))
    return 0


def _cmd_prepare_coco(args: argparse.Namespace) -> int:
    from csr_plugin.eval.coco import CocoError, eval_section, prepare_coco

    try:
        summary = prepare_coco(args.annotations, args.images, args.out, args.split, args.count, args.seed)
    except CocoError as exc:
        raise ConfigError(str(exc)) from None
    print(f"{summary['chair_images']} CHAIR images, {summary['pope_images']} POPE images "
          f"({', '.join(f'{n} {s}' for s, n in summary['pope_questions'].items())} questions) -> {args.out}")
    print("the recipe's eval section (csr eval --config R.yaml, or csr run):")
    print(eval_section(args.out))
    return 0


def _cmd_prepare_holdout(args: argparse.Namespace) -> int:
    from csr_plugin.holdout import split_holdout

    got = split_holdout(args.prompts, args.out, args.count, args.seed)
    print(f"{got['train']} prompts to train on, {got['holdout']} held out ({got['images']} images)"
          + (f"; {got['unusable']} unusable lines left out" if got["unusable"] else "") + f" -> {args.out}")
    print(f"in the recipe: data.prompts: {Path(args.out) / 'train.jsonl'}  and  loop.holdout: "
          f"{Path(args.out) / 'holdout.jsonl'}")
    return 0


def _cmd_train_ppo(args: argparse.Namespace) -> int:
    from csr_plugin.openrlhf.ppo import train_ppo, write_ppo_prompts, write_working_dir

    recipe = load_recipe(args.config, args.overrides)
    if args.prepare_only:
        path, skipped = write_ppo_prompts(recipe)
        print(f"OpenRLHF prompt dataset: {path} ({skipped} prompts skipped)")
        # `ray job submit --runtime-env-json` (csr recipe show) uploads this folder to every node
        print(f"Ray working_dir: {write_working_dir(recipe, args.config, args.overrides)}")
        return 0
    _route_logs(recipe.output_dir)
    preflight("train-ppo")
    check_recipe_paths(recipe, "train-ppo")
    return train_ppo(recipe, args.config, args.overrides)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from csr_plugin.doctor import report

    lines, code = report()
    print("\n".join(lines))
    return code


def _cmd_recipe_show(args: argparse.Namespace) -> int:
    from csr_plugin.recipe_commands import check, show

    recipe = load_recipe(args.recipe, args.overrides)
    print(show(recipe, args.recipe, args.overrides))
    if args.check:
        checked = check(recipe, args.recipe, args.overrides)
        print(f"# flags checked by the entry points that run them: {'; '.join(checked)}")
    return 0


def _cmd_recipe_flags(args: argparse.Namespace) -> int:
    from csr_plugin.recipe_commands import named_flags_markdown

    print(named_flags_markdown(), end="")
    return 0


def _add_overrides(parser: argparse.ArgumentParser, help: str = "recipe overrides") -> None:
    # default=[]: not "required" (with the intermixed parsing, a missing recipe was reported as a missing override)
    parser.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value", help=help)


_VERBOSE_HELP = ("show everything on the terminal: debug logging, library warnings, every DPO rank's output "
                 "(by default they go to <output_dir>/logs/)")


def _quiet_by_default(parser: argparse.ArgumentParser) -> None:
    """Stage lines and results on the terminal, the rest under <output_dir>/logs/ (csr_plugin/run_logs.py)."""
    # SUPPRESS: `csr -v demo` is not undone by this option's default
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    parser.set_defaults(quiet_logs=True)


def _route_logs(output_dir: str) -> None:
    """In quiet mode: warnings and library logs to <output_dir>/logs/csr.log (prints that folder once)."""
    from csr_plugin import run_logs

    if run_logs.is_quiet():
        run_logs.route_logs(output_dir)


class _AnyOrderParser(argparse.ArgumentParser):
    """A subcommand takes its flags and its positionals (the recipe, `key.sub=value` overrides) in any order:
    plain argparse ends a `nargs="*"` positional at the first flag, so `csr recipe show R --check k=v` failed."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        # parse_known_intermixed_args calls parse_known_args itself (twice); a parser with subcommands of its
        # own cannot be intermixed, its leaves are.
        if self._intermixing or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _leaf_parsers(parser: argparse.ArgumentParser, leaves_only: bool = True):
    """Every parser that runs a command (`csr sample`, `csr recipe show`, ...), nested subcommands included;
    with ``leaves_only=False`` also those in between (`csr recipe`, `csr prepare`)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions or not leaves_only:
        yield parser
    for action in actions:
        for child in dict.fromkeys(action.choices.values()):   # aliases map to the same parser
            yield from _leaf_parsers(child, leaves_only)


def build_parser() -> argparse.ArgumentParser:
    parser = _AnyOrderParser(prog="csr", description="Calibrated Self-Rewarding (CSR) for VLMs, in OpenRLHF.")
    parser.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sample", help="sentence-level beam search with calibrated rewards -> trees.jsonl",
                       description="Search every prompt of data.prompts; resumable: rerun to continue.")
    p.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--ray", action="store_true", help="shard the prompts over Ray sampling actors "
                   "(see docs/openrlhf.md)")
    p.add_argument("--actors", type=int, default=2, help="sampling actors with --ray, one CPU or GPU each "
                   "(default: 2)")
    p.add_argument("--ray-address", metavar="ADDR", help="existing Ray cluster (auto, host:6379, "
                   "ray://host:10001); default: start a local one")
    p.add_argument("--openrlhf", action="store_true", help="with --ray: the actors are OpenRLHF's vLLM rollout "
                   "actors running our agent executor (GPUs, needs vllm)")
    p.add_argument("--rm", help="reward model (`csr train-rm` final/): draw the candidate sentences with PARGS "
                                "(search.decoding=pargs, search.rm=PATH; k, w in search.pargs)")
    _add_overrides(p)
    _quiet_by_default(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("curate", help="search trees -> chosen/rejected preference pairs (JSONL)",
                       description="Chosen = highest cumulative calibrated reward, rejected = lowest.")
    p.add_argument("--trees", required=True, help="trees.jsonl written by `csr sample`")
    p.add_argument("--out", required=True, help="pairs JSONL to write")
    p.add_argument("--config", help="recipe YAML whose `curation` section to use")
    p.add_argument("--min-margin", type=float, default=0.0, help="drop pairs with a smaller reward margin")
    p.add_argument("--sum", action="store_true", help="score responses by the sum, not the mean, of rewards")
    _add_overrides(p, "recipe overrides (with --config)")
    p.set_defaults(func=_cmd_curate, quiet_logs=True)   # quiet: library warnings held back (shown with -v)

    p = sub.add_parser("train-dpo", help="multimodal DPO / IPO / TDPO on OpenRLHF's DeepSpeed trainer (ZeRO-3)",
                       description="Trains model.path on dpo.pairs; writes <output_dir>/final. Resumable.")
    p.add_argument("--config", required=True, help="recipe YAML with a `dpo` section")
    _add_overrides(p)
    _quiet_by_default(p)
    p.set_defaults(func=_cmd_train_dpo)

    p = sub.add_parser("train-rm", help="multimodal Bradley-Terry reward model (VLM + scalar head), ZeRO-3",
                       description="Trains a reward model on model.path from rm.pairs; writes <output_dir>/final "
                                   "and rm_metrics.jsonl (held-out accuracy per epoch). Resumable.")
    p.add_argument("--config", required=True, help="recipe YAML with an `rm` section")
    p.add_argument("--pairs", help="pairs JSONL (default: rm.pairs)")
    p.add_argument("--out", help="output folder (default: output_dir)")
    _add_overrides(p)
    _quiet_by_default(p)
    p.set_defaults(func=_cmd_train_rm)

    p = sub.add_parser("run", help="the iterative CSR loop: sample -> curate -> DPO, T times, resumable",
                       description="Writes iter_<t>/ folders, metrics.jsonl and metrics.png under output_dir.")
    p.add_argument("--config", required=True, help="recipe YAML with `loop` and `dpo` sections")
    _add_overrides(p)
    _quiet_by_default(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("eval", help="hallucination of a checkpoint: CHAIR_s, CHAIR_i, object recall, POPE",
                       description="Evaluates model.path (or --model) on the recipe's `eval` section.")
    p.add_argument("--config", required=True, help="recipe YAML with an `eval` section")
    p.add_argument("--model", help="checkpoint to evaluate (default: model.path)")
    p.add_argument("--out", help="write the full result as JSON here")
    p.add_argument("--rm", help="reward model (`csr train-rm` final/): decode with PARGS (eval.decoding=pargs, "
                                "eval.rm=PATH; k, w in eval.pargs)")
    p.add_argument("--responses", action="append", metavar="[SETTING=]FILE",
                   help="score answers already written, no model loaded: JSONL captions {image_id|id, "
                        "caption|response} and/or POPE answers {question_id, answer}; SETTING= (random, popular, "
                        "adversarial) names a POPE answer file's setting. Repeatable.")
    _add_overrides(p)
    _quiet_by_default(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("prepare", help="`csr prepare coco`: COCO's CHAIR and POPE files; `csr prepare holdout`: held-out prompts",
                       description="Builds an evaluation set for `csr eval` from a dataset download.")
    prepare_sub = p.add_subparsers(dest="prepare_command", metavar="DATASET", required=True)
    q = prepare_sub.add_parser("coco", help="from COCO's instances_<split>.json and captions_<split>.json",
                               description="Writes prompts.jsonl (description prompts), truth.jsonl (CHAIR's "
                                           "ground truth: instances + caption mentions), objects.json (CHAIR's "
                                           "80 objects, synonyms and word rules) and pope_{random,popular,"
                                           "adversarial}.jsonl (built as POPE builds them) under --out.")
    q.add_argument("--annotations", required=True, metavar="DIR", help="COCO's annotations/ folder")
    q.add_argument("--images", required=True, metavar="DIR", help="the split's image folder, e.g. coco/val2014")
    q.add_argument("--out", required=True, metavar="DIR", help="where the evaluation files go")
    q.add_argument("--split", default="val2014", help="COCO split (default: val2014, the paper's)")
    q.add_argument("--count", type=int, default=500, help="images for CHAIR and for POPE (default: 500)")
    q.add_argument("--seed", type=int, default=0, help="sampling seed of the images and POPE's negatives")
    q.set_defaults(func=_cmd_prepare_coco, quiet_logs=True)
    q = prepare_sub.add_parser("holdout", help="split CSR prompts by image into train.jsonl and holdout.jsonl "
                                               "(loop.holdout)",
                               description="Holds out --count images of a prompts file (every question about one "
                                           "image on one side): data.prompts and loop.holdout of `csr run`.")
    q.add_argument("--prompts", required=True, metavar="FILE", help="the CSR prompts JSONL {id, image, question}")
    q.add_argument("--out", required=True, metavar="DIR", help="where train.jsonl and holdout.jsonl go")
    q.add_argument("--count", type=int, default=100, help="images to hold out (default: 100)")
    q.add_argument("--seed", type=int, default=0, help="seed of the draw")
    q.set_defaults(func=_cmd_prepare_holdout, quiet_logs=True)

    p = sub.add_parser("serve-reward", help="HTTP server for OpenRLHF's --reward.remote_url: calibrated rewards",
                       description="POST /get_reward {query, prompts, labels} -> {rewards, scores}; the image "
                                   "travels in each label as {\"image\": path} or a plain path.")
    p.add_argument("--config", required=True, help="recipe YAML (model, clip, reward, search.delimiters)")
    p.add_argument("--host", default=None, help="bind address (default: serve.host, 127.0.0.1; 0.0.0.0 exposes it "
                   "to other nodes)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default: serve.port, 5000)")
    p.add_argument("--max-batch", type=int, default=64, help="responses per scoring forward")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting before a 503")
    # Defaults = reward_server.DEFAULT_TIMEOUT_S / DEFAULT_MAX_REQUEST_BYTES (not imported: --help stays fast).
    p.add_argument("--timeout", type=float, default=200.0,
                   help="seconds before a waiting request gets a 504 (default: %(default)s, above OpenRLHF's 180 s "
                        "client timeout, so a request its client still waits for is never cut and retried)")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20,
                   help="larger request bodies get a 413 before they are read (default: %(default)s = 16 MiB)")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="refuse (403) label images outside DIR, symlinks and '..' resolved (default: any path)")
    _add_overrides(p)
    p.set_defaults(func=_cmd_serve_reward)

    p = sub.add_parser("demo", help="the toy world end to end: CSR iterations lower measured hallucination",
                       description="Builds the toy world and its tiny models once, then runs CSR iterations "
                                   "through the real pipeline and prints CHAIR / POPE per iteration.")
    p.add_argument("--output", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    p.add_argument("--iterations", type=int, default=3, help="CSR iterations T (default: 3)")
    p.add_argument("--lambda", dest="lambda_", type=float, default=0.9, help="CLIP weight (default: 0.9)")
    p.add_argument("--config", default="recipes/toy.yaml", help="recipe (default: recipes/toy.yaml)")
    p.add_argument("--quick", action="store_true", help="a smaller world and weaker models built in about a minute")
    p.add_argument("--build-only", action="store_true", help="only build (or find) the toy world and its models "
                   "under .cache/toy/seed<N>/, which the toy recipes name; no CSR iterations")
    _add_overrides(p)
    _quiet_by_default(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train-ppo", help="OpenRLHF PPO / REINFORCE with CSR rollouts and step-wise rewards",
                       description="Runs openrlhf.cli.train_ppo_ray with our agent executor in its vLLM engines "
                                   "and, with ppo.dense_rewards, each sentence's reward at its last token.")
    p.add_argument("--config", required=True, help="recipe YAML with a `ppo` section")
    p.add_argument("--prepare-only", action="store_true",
                   help="only write the OpenRLHF prompt dataset and the Ray working_dir (for `ray job submit`, "
                        "see `csr recipe show`)")
    _add_overrides(p)
    _quiet_by_default(p)
    p.set_defaults(func=_cmd_train_ppo)

    p = sub.add_parser("doctor", help="the GPU stack: torch, CUDA and driver, GPUs, flash-attn, vLLM, DeepSpeed, "
                       "OpenRLHF, Ray", description="Reports what this machine can run and warns about what will "
                       "not work; exits 1 when nvidia-smi lists GPUs that torch cannot use. The GPU commands run "
                       "the same check before their first stage.")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("recipe", help="`csr recipe show R.yaml`: the exact csr / torchrun / OpenRLHF / ray commands",
                       description="Prints every command a recipe runs; --check checks the OpenRLHF flags with the "
                                   "entry point that runs them (train_ppo_ray's parser needs vllm importable, for "
                                   "recipes with a ppo: section). `csr recipe flags`: which recipe key sets which "
                                   "OpenRLHF flag.")
    recipe_sub = p.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    q = recipe_sub.add_parser("show", help="print the commands")
    q.add_argument("recipe", help="recipe YAML")
    q.add_argument("--check", action="store_true", help="validate the flags with OpenRLHF's parsers")
    _add_overrides(q)
    # quiet: torch's pynvml FutureWarning and DeepSpeed's "Setting accelerator to CPU" (train_ppo_ray's
    # parser, --check) are held back, shown with -v
    q.set_defaults(func=_cmd_recipe_show, quiet_logs=True)
    q = recipe_sub.add_parser("flags", help="which recipe key sets which OpenRLHF flag (the rest: dpo.openrlhf / "
                                            "ppo.openrlhf)")
    q.set_defaults(func=_cmd_recipe_flags, quiet_logs=True)
    for leaf in _leaf_parsers(parser, leaves_only=False):   # `-v` after any command word too, as before it
        if "--verbose" not in leaf._option_string_actions:
            # SUPPRESS: `csr -v curate ...` is not undone by this option's default
            leaf.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=_VERBOSE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Libraries (open_clip, transformers) log chattily at INFO: only ours speaks up by default.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("csr_plugin").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from csr_plugin import run_logs
    from csr_plugin.training.launch import inside_distributed_launch

    # Before the heavy imports, whose warnings are part of what goes to the log file. A rank started by
    # an outside launcher (torchrun -m csr_plugin.cli train-dpo) leaves its output to that launcher.
    quiet = getattr(args, "quiet_logs", False) and not args.verbose and not inside_distributed_launch()
    if quiet:
        run_logs.quiet_terminal()
    from csr_plugin.sampling.local import SystematicFailure

    def logs_hint() -> None:
        if run_logs.active_logs_dir() is not None:
            print(f"csr {args.command}: logs: {run_logs.active_logs_dir()}/", file=sys.stderr, flush=True)

    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"csr {args.command}: error: {exc}", file=sys.stderr)
        if isinstance(exc, LoadFailure):
            run_logs.record_crash(exc)   # the loader's traceback: in the log, not on the terminal
        if getattr(exc, "unknown_key", None):
            from csr_plugin.key_hints import suggestions

            for hint in suggestions(exc.unknown_key):
                print(f"csr {args.command}: hint: {hint}", file=sys.stderr)
        logs_hint()
        return 2
    except GpuUnusable as exc:   # before any stage ran: nothing in the logs to point at
        print(f"csr {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except SystematicFailure as exc:
        print(f"csr {args.command}: stopped: {exc}", file=sys.stderr)
        logs_hint()
        return 1
    except Exception as exc:
        run_logs.record_crash(exc)   # the traceback follows on the terminal
        logs_hint()
        raise
    finally:
        if quiet:
            run_logs.restore()   # a caller that goes on (the tests) gets its logging back as it was


if __name__ == "__main__":
    sys.exit(main())
