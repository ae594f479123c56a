"""The server side: gRPC servicer, store, ingest, and the operator CLI."""
