"""Hookspecs, the plugin manager and the built-in strategies. Plugins import only the core;
a plugin that needs storage gets a narrow interface (see ``admission``), never a connection."""
