"""Tests for the wire-level provider emulators (bench/emulators)."""
