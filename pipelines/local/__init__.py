"""Pipeswitch."""
