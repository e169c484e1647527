"""End to end: the real server against real clients and processes."""
