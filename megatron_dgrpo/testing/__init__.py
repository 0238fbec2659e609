"""Helpers for tests that need real processes (gloo) and tiny models."""
