"""The site side: ClientApp wiring, the per-process site runtime, local training, client mods."""
