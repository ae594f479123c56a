"""The coordinator's read-only HTTP side (``[metrics] listen``): Prometheus metrics, a live
page of rounds, lineage, leaderboard and ledger, and the JSON behind it."""
