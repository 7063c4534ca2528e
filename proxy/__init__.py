"""The vcache proxy in front of llama-server."""
