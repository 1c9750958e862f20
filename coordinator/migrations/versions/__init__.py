"""Revisions of the registry schema, oldest first: ``v<rev>_<slug>.py``, rev ids 0001, 0002…"""
