"""Standalone Pallas kernels (no dependency on dsjax)."""
