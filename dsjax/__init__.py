"""dsjax: a JAX/Flax DeepSeek-style code language model stack."""

__version__ = '0.1.0'
