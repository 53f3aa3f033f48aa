"""Example Python pipeline builders (see the README, "Pipelines in Python")."""
