"""FastAPI routers, one per concern: TAP sync, VOSI, examples, SCS, health."""
