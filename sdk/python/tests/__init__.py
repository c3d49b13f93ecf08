"""Tests of the chalkcompute Python SDK (against a real chalkd where they need a server)."""
