"""Security: egress guard, encryption at rest, audit log."""
