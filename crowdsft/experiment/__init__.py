"""Experiments from the paper on open models: the paper's LLM experiment on its own data."""
