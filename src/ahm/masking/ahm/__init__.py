"""AHM: the reinforcement-learned (A3C / A2C) adaptive hard masking policy, registered as "ahm"."""

from ahm.masking.ahm.agent import AhmAgent
from ahm.masking.ahm.policy import AHMPolicy
from ahm.masking.ahm.sampling import gumbel_noise, gumbel_topk, plackett_luce_log_prob, plackett_luce_steps

__all__ = ["AHMPolicy", "AhmAgent", "gumbel_noise", "gumbel_topk", "plackett_luce_log_prob", "plackett_luce_steps"]
