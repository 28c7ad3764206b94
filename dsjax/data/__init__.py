"""Data: corpus.py (document sources and the stable train/validation split), tokenizer.py (byte-level and Hugging Face
tokenizers, BPE training CLI), pipeline.py (grain pipeline: shard, shuffle, tokenize, pack, batch, checkpointable).

Nothing is imported here, so `import dsjax.data.tokenizer` does not pull in grain.
"""
