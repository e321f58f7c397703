"""Completeness audit: the consumer's daily reports (report.py) and `keplerlog-audit` reading them."""
