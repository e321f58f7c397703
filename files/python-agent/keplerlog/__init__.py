"""kepler-log: ship Dockerised services' log lines through Kafka into central day files."""

__version__ = "0.1.0"
