"""Versioned SQL migrations: NNN_name.sql, applied in order under an advisory lock."""
