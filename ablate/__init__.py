"""ablate: staged attention-mask ablation studies on Hugging Face decoder LMs."""

__version__ = "0.1.0"
