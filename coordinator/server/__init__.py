"""Serving: the server factory (``app``), the thin gRPC servicer with its one error table
(``servicer``), node requests (``service``), contribution ingest (``ingest``), the per-node
rate limit (``ratelimit``) and creating a coordinator folder (``scaffold``)."""
