"""Built-in algorithms plugins."""
