"""Built-in reward heads plugins."""
