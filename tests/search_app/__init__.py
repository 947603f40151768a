"""A cheap objective app (no DETR) and helpers for the sweeper's tests."""
