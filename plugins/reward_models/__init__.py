"""Built-in reward models plugins."""
