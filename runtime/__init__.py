"""Backends, decode state handling, samplers and generation loops."""
