"""dflash-ds: one-step block-diffusion drafters trained as LoRA adapters on the target model, on DeepSpeed."""

__version__ = "0.1.0"
