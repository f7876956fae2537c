"""Run files: a Run written step by step into SQLite as training goes, and read back. Imports
``mpdiag.core`` only."""
