"""Celery workers: filter, decode, classify, report and deliver."""
