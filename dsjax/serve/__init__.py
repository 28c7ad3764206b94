"""The OpenAI-compatible server: HTTP API (api.py), chat templates (chat.py), errors (errors.py)."""
