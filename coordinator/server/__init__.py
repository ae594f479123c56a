"""Serving: the coordinator process (``app``: a ``grpc.aio`` server on its own event loop),
the thin servicer with its one error table (``servicer``), upload streams (``upload``), node
requests (``service``), contribution ingest (``ingest``), limits per address and per node
(``ratelimit``), memory hygiene (``memory``) and creating a coordinator folder
(``scaffold``)."""
