""""Did you mean ..." for an unknown recipe key that an OpenRLHF user would type.

config.py already suggests close spellings within the key's own section. This adds what needs the
OpenRLHF flag tables (`csr recipe flags`, built from the flag builders, so torch is imported: only
after a key was refused): an OpenRLHF flag name (`model.beta`, `reward.clip_range`, or the flat
pre-0.11 `train_batch_size`) points at the recipe key that sets that flag, and a key that lives in
another section (`search.lr`) at that section.
"""
from __future__ import annotations

import dataclasses
import difflib

from csr_plugin.config import Recipe, field_key

# Sections whose `openrlhf:` mapping takes any other flag of their trainer verbatim.
PASSTHROUGH_SECTIONS = ("dpo", "ppo", "rm")


def _flat(name: str) -> str:
    return name.replace(".", "_").replace("-", "_")


def _keys_by_section() -> dict[str, set[str]]:
    recipe = Recipe()
    return {f.name: {field_key(g.name) for g in dataclasses.fields(getattr(recipe, f.name))}
            for f in dataclasses.fields(recipe) if dataclasses.is_dataclass(getattr(recipe, f.name))}


def suggestions(key: str) -> list[str]:
    """Hint lines for the unknown dotted ``key`` (as ConfigError.unknown_key names it); [] when none."""
    from csr_plugin.recipe_commands import named_flags

    section, _, rest = key.partition(".")
    if not rest:
        return []
    spelled = {_flat(key), _flat(rest)}
    owners: dict[str, list[str]] = {}   # OpenRLHF flag -> the recipe keys that set it
    for _, by_key in named_flags():
        for recipe_key, flags in by_key.items():
            for flag in flags:
                if _flat(flag) in spelled:
                    owners.setdefault(flag, []).append(recipe_key)
    hints = []
    for flag, recipe_keys in owners.items():
        # `dpo.train_batch_size`: --train.batch_size is set by dpo.batch, ppo.train_batch and rm.batch
        same_section = [k for k in recipe_keys if k.split(".")[0] == section]
        chosen = same_section or recipe_keys
        hints.append(f"`{key}` is OpenRLHF's `--{flag}`, which the recipe key "
                     f"{' or '.join(f'`{k}`' for k in chosen)} sets: did you mean `{chosen[0]}`?")
    sections = _keys_by_section()
    leaf = rest.split(".")[-1]
    if not hints:
        elsewhere = sorted(f"{s}.{leaf}" for s, keys in sections.items() if leaf in keys and s != section)
        if elsewhere:
            hints.append(f"`{leaf}` is a key of another section: did you mean "
                         f"{' or '.join(f'`{k}`' for k in elsewhere)}?")
    # a near spelling of one of the section's keys is config.py's hint already (`dpo.bta`: `dpo.beta`)
    near = difflib.get_close_matches(leaf, sections.get(section, ()), n=1, cutoff=0.6)
    if not hints and not near and section in PASSTHROUGH_SECTIONS:
        hints.append(f"an OpenRLHF flag no recipe key sets goes under `{section}.openrlhf`, e.g. "
                     f"{section}.openrlhf.{rest}=... (csr recipe flags; docs/openrlhf-flags.md).")
    return hints
