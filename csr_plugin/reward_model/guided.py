"""PARGS reward-guided decoding moved to csr_plugin/sampling/pargs_decoding.py, beside the engines (a
decoding strategy, not part of the reward model); its public names stay importable from here."""
from csr_plugin.sampling.pargs_decoding import (  # noqa: F401
    SUPPORTED, DecodeSetup, GuidedRow, PargsSettings, check_models, check_window, decode_prompts, guided_decode,
    guided_decode_naive, guided_decode_rows, setup_for)
