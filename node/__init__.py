"""The contributor side: the coordinator client, local state, upload, ledger verification
and the node CLI. Keys and envelopes are in the core (``crowdsft.keys``, ``crowdsft.envelope``)."""
