"""Our `dpo:` section maps onto OpenRLHF's own train_dpo flags, checked against its argument parser."""
import os
import re
import subprocess
import sys

from csr_plugin.config import DPOConfig
from csr_plugin.training.openrlhf_args import dpo_flags


def _train_dpo_flags() -> set[str]:
    env = dict(os.environ, FLASH_ATTENTION_TRITON_AMD_ENABLE="TRUE")
    out = subprocess.run([sys.executable, "-m", "openrlhf.cli.train_dpo", "--help"], capture_output=True, text=True,
                         env=env, timeout=300).stdout
    return set(re.findall(r"--([a-z_][\w.]*)", out))


def test_every_flag_we_set_is_one_of_openrlhf_train_dpo():
    ours = set(dpo_flags(DPOConfig(), "model", "pairs.jsonl", "out"))
    theirs = _train_dpo_flags()
    assert len(theirs) > 50, "could not read OpenRLHF's train_dpo flags"
    assert ours - theirs == set(), f"flags OpenRLHF's train_dpo does not define: {sorted(ours - theirs)}"
