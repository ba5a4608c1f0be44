"""sarcasm-dpo: SFT -> DPO -> honest comparison, for sarcasm detection with small chat models."""

__version__ = "0.1.0"
