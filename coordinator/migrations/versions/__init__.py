"""Revisions of the registry schema, oldest first: ``v<rev>_<slug>.py``.

Each names its ``down_revision``; ids are not contiguous (0002 and 0007 were reserved and never
needed).
"""
