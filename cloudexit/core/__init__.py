"""Shared ground: errors, units, settings, safe paths and files, words, checksums."""
