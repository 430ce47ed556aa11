"""Calibrated Self-Rewarding (CSR) for vision-language models, inside OpenRLHF."""
__version__ = "0.1.0"
