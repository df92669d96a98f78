"""Ingest pipelines: releases and alert streams."""
