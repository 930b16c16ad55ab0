"""Integrations with training frameworks (imported on demand: `molf.integrations.hf`)."""
