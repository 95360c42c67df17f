"""llama2: the complete system of the Llama 2 paper (Touvron et al., 2023) on PyTorch."""
__version__ = "0.1.0"
