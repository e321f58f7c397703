"""Retention job: delete (and optionally compress) day files judged by the date in their name."""
