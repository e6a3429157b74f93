"""Evaluation: official Molmo metrics, offline scoring, the benchmark task registry and runner."""
