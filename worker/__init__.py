"""Celery workers: thin tasks that load a job row by id and call one pipeline."""
