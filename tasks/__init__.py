"""Prefect tasks: thin adapters around objret's plain functions, adding retries, logging and MLflow records."""
