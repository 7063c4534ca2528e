"""The side that faces llama-server.

`client` holds the upstream's address, learns what it can take (`Capabilities`: packages,
namespace) and asks it to encode images; `relay` sends a request there and streams its answer
back unchanged; `supervisor` starts, watches and restarts a managed llama-server.
"""
