"""Ingest: frame sources (image folders, video files, s3:// prefixes) enter; decoded, checked, content-hashed
frames leave as the lake manifest (frame id, URI, source, time, size), with the roots a report may read from.
"""
