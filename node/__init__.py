"""The contributor side: identity keys, envelope signing, the coordinator client, node CLI."""
