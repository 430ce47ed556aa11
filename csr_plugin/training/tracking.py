"""The recipe's `logging:` section as OpenRLHF's --logger.* flags and the environment wandb reads.

OpenRLHF switches wandb on when ``--logger.wandb.key`` is set and then calls
``wandb.login(key=...)`` only if wandb has no key of its own (``wandb login``,
WANDB_API_KEY). We never put a real key in the flags (they are printed by
`csr recipe show` and stored in the wandb run's config): the flag carries a
placeholder, and the key, when online, comes from wandb's own places.
Offline, ``wandb.login`` accepts the placeholder without checking or saving it
(wandb 0.31). TensorBoard goes to <folder>/tensorboard/<run name>/ (OpenRLHF
adds the run name).
"""
from __future__ import annotations

import os
from pathlib import Path

from csr_plugin.config import ConfigError, LoggingConfig

KEY_PLACEHOLDER = "from-wandb-login-or-WANDB_API_KEY"


def run_name(cfg: LoggingConfig, folder: str | Path) -> str:
    """``logging.wandb_run_name``, else the run folder's name; a CSR iteration's DPO folder
    (<run>/iter_<t>/dpo) adds -iter_<t>, so the iterations of one `csr run` stay apart."""
    folder = Path(folder).resolve()
    suffix = ""
    if folder.name == "dpo" and folder.parent.name.startswith("iter_"):
        suffix, folder = f"-{folder.parent.name}", folder.parent.parent
    elif folder.name == "ppo":   # `csr train-ppo` writes to <output_dir>/ppo
        folder = folder.parent
    return (cfg.wandb_run_name or folder.name) + suffix


def logger_flags(cfg: LoggingConfig, folder: str | Path) -> dict:
    """OpenRLHF's --logger.* flags (train_dpo and train_ppo_ray share them) for a run writing to ``folder``."""
    return {
        "logger.wandb.key": (cfg.wandb_mode if cfg.wandb_mode == "offline" else KEY_PLACEHOLDER) if cfg.wandb
        else None,
        "logger.wandb.org": cfg.wandb_org, "logger.wandb.group": cfg.wandb_group,
        "logger.wandb.project": cfg.wandb_project, "logger.wandb.run_name": run_name(cfg, folder),
        "logger.tensorboard_dir": str(Path(folder) / "tensorboard") if cfg.tensorboard else None,
        "logger.logging_steps": cfg.steps,
    }


def wandb_env(cfg: LoggingConfig, folder: str | Path) -> dict[str, str]:
    """Environment of the process that runs OpenRLHF's trainer: WANDB_MODE from the recipe, and the run
    files under ``folder`` (wandb writes <WANDB_DIR>/wandb/; a WANDB_DIR already set is kept)."""
    if not cfg.wandb:
        return {}
    return {"WANDB_MODE": cfg.wandb_mode, "WANDB_DIR": os.environ.get("WANDB_DIR") or str(Path(folder).resolve())}


def check_wandb_login(cfg: LoggingConfig) -> None:
    """Online wandb needs a key from wandb itself; fail before anything loads rather than at step 0."""
    if not cfg.wandb or cfg.wandb_mode != "online":
        return
    import wandb

    if not wandb.api.api_key:
        raise ConfigError("`logging.wandb_mode: online` needs a W&B API key: run `wandb login` or set "
                          "WANDB_API_KEY; or use `logging.wandb_mode: offline` and `wandb sync` later.")
