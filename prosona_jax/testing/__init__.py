"""Helpers for tests and benchmarks; nothing here is imported by training or serving."""
