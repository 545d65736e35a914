"""Synthetic and benchmark tasks for long-range memory."""
