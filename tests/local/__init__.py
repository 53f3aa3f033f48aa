"""Tests for the local (offline) inference servers."""
