"""Thin entry points: `python -m jobs.NAME ...`, what `ray job submit -- python -m jobs.NAME` runs."""
