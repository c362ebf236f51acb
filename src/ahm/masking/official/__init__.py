"""The authors' staged AHM pipeline (Xu et al. 2025, code at GitHub Dearbreeze/AHM), registered as "ahm-official"."""

from ahm.masking.official.policy import OfficialAHMPolicy
from ahm.masking.official.reward import official_agent_loss, official_reward, patch_reward_terms

__all__ = ["OfficialAHMPolicy", "official_agent_loss", "official_reward", "patch_reward_terms"]
