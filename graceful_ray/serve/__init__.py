"""Shadow mode on Ray Serve (issue 5): lands with the serving work."""
