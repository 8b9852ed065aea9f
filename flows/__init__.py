"""Prefect flows composed from the tasks: build-index, mine, evaluate."""
