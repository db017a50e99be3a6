"""c360 services and their shared runtime."""
