"""The server side. ``server/`` serves gRPC (servicer, ingest, rate limit, scaffold);
``store/`` holds SQLite and all of its SQL; ``rounds/`` runs fine-tuning rounds as persisted
steps; ``training/`` is LoRA training and the LLM model space (the only modules that import
torch); ``report/`` writes the HTML report. See docs/architecture.md."""
