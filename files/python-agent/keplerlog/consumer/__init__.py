"""Central consumer: Kafka topic -> day files, at-least-once to disk without duplicates."""
