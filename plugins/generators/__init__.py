"""Rollout engines (group ``generator``)."""
