"""CSR's calibrated reward behind OpenRLHF's reward hooks: a `reward_func` file and an HTTP reward server."""
