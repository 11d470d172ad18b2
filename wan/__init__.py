"""Wan 2.2 text-to-video (T2V-A14B): a faithful, fast re-implementation."""
