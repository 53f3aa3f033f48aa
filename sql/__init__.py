"""Pipeswitch's PostgreSQL migrations (``NNN_description.sql``), shipped inside the wheel.

Applied in name order by ``pipeswitch migrate`` (:mod:`pipeswitch.config.db`); each file is
idempotent on its own, so a half-applied run or a second instance can never break a database.
"""
