"""Prefect flows composed from the tasks: build-index, mine, evaluate."""

from flows import log_records

log_records.install()   # in every process that runs objret's flows: the CLI, served runs, workers
