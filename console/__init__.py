"""The operator console: an HTTP API with roles and an audit log, and the dashboard it serves."""
