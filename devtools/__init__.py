"""Helpers for what runs the product from outside: tests, drills and benchmarks (not shipped)."""
