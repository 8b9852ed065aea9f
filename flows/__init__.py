"""Prefect flows composed from the tasks: build-index, mine, evaluate."""

from flows.redaction import redact_log_records

redact_log_records()   # in every process that runs objret's flows: the CLI, served runs, workers
