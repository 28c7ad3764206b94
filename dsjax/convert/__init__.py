"""Converters between dsjax checkpoints and other ecosystems (Hugging Face safetensors)."""
