"""Tamper-evident audit logs: hash-chained, Ed25519-signed JSON lines written by the coordinator and by each site."""
