"""Helpers for tests and benchmarks: a throw-away Kafka broker from the project's distribution."""
