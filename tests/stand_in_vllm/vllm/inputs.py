"""Stand-in for vllm.inputs."""
from __future__ import annotations

from typing import Any, TypedDict

from typing_extensions import NotRequired


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]
    multi_modal_data: NotRequired[dict[str, Any]]
