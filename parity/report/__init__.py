"""Rendering of library results: tables for terminals and files, plots."""
