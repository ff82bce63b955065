"""The model: ModelConfig and the LLaMA-style decoder."""
