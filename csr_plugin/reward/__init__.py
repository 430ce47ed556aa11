"""CSR's reward: instruction-following score R_T, CLIP image relevance R_I, and their calibration."""
from csr_plugin.reward.calibration import calibrated_reward, rank_fusion_reward
from csr_plugin.reward.instruction import instruction_score

__all__ = ["calibrated_reward", "rank_fusion_reward", "instruction_score", "ClipRelevance"]


def __getattr__(name):
    # open_clip is heavy: imported only when CLIP is actually used.
    if name == "ClipRelevance":
        from csr_plugin.reward.clip_relevance import ClipRelevance
        return ClipRelevance
    raise AttributeError(name)
