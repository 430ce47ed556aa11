"""Check argument lists against OpenRLHF's own command-line entry points, without training.

OpenRLHF builds its parsers inside ``if __name__ == "__main__":`` blocks, so the
only faithful check is to run that block: we run the module as ``__main__`` with
our argv and stop it where training would start (its ``get_strategy`` call).
What we get back is the hierarchical namespace after OpenRLHF's own parsing,
``hierarchize`` and post-parse assertions, so a flag it would reject, a bad
choice or an inconsistent batch size fails here exactly as it would on the
cluster.
"""
from __future__ import annotations

import io
import runpy
import sys
from contextlib import contextmanager, redirect_stderr
from typing import Any, Iterator
from unittest import mock

from csr_plugin.config import ConfigError


class _Stop(Exception):
    def __init__(self, args: Any):
        super().__init__("stopped before training")
        self.namespace = args


class OpenRLHFArgsError(ConfigError):
    """OpenRLHF's entry point rejected the arguments."""


@contextmanager
def argv_as(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def parse_openrlhf_args(module: str, argv: list[str]) -> Any:
    """``python -m <module> <argv>`` up to the point where it would train; returns its args namespace."""
    import openrlhf.utils

    def stop(args, *_, **__):
        raise _Stop(args)

    # train() calls ray.init when Ray is down: pretend it is up, the check must not start a cluster.
    usage_errors = io.StringIO()
    with mock.patch.object(openrlhf.utils, "get_strategy", stop), mock.patch("ray.is_initialized", lambda: True), \
            argv_as([module, *argv]):
        try:
            with redirect_stderr(usage_errors):
                runpy.run_module(module, run_name="__main__", alter_sys=False)
        except _Stop as stopped:
            return stopped.namespace
        except SystemExit as exc:  # argparse: unknown flag, bad choice or type
            why = usage_errors.getvalue().strip().splitlines()[-1:] or [f"exit {exc.code}"]
            raise OpenRLHFArgsError(f"{module} rejected the arguments: {why[0]}") from None
        except ImportError as exc:
            raise OpenRLHFArgsError(f"cannot run {module}'s checks here: {exc}. They need OpenRLHF's own imports "
                                    "(train_ppo_ray imports vllm): run --check where vllm is installed.") from None
        except AssertionError as exc:
            raise OpenRLHFArgsError(f"{module} rejected the arguments: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - its post-parse code failed on these arguments
            raise OpenRLHFArgsError(f"{module} failed on the arguments: {type(exc).__name__}: {exc}") from None
    raise OpenRLHFArgsError(f"{module} returned without reaching training; nothing was checked.")
