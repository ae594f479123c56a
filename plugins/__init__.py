"""Hookspecs, the plugin manager and the built-in strategies (see the strategies issue)."""
