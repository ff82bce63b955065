"""flopwise: the best small language model a compute budget can buy."""

__version__ = "0.1.0"
