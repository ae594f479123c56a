"""The coordinator's SQLite store and every SQL statement the coordinator runs: the database
and its writer thread (``db``), typed queries (``queries``), the ledger table (``chain``) and
invites (``invites``)."""
