"""edgeft: fine-tune a small LLM, compress it, export it and measure it on an edge device."""

__version__ = "0.1.0"
