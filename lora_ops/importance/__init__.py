"""Importance criteria (one module per criterion)."""
