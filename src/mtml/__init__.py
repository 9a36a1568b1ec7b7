"""mtml."""
