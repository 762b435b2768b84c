"""qtllava: split learning for vision-language models with quantized, entropy-coded features on the cut."""

__version__ = "0.1.0"
