"""The vcache proxy in front of llama-server: the request path (it depends on vision_cache,
never the reverse).

Subpackages, in the order a request travels: `web` (the aiohttp app clients talk to, the
/vcache/ admin endpoints, metrics, the body budget), `images` (finding the images in a
request, loading them under the SSRF policy, checking their headers), `lookup` (image ->
package: store, shared tier, encoder), `upstream` (llama-server: its client and capabilities,
the relay of requests and streams, the managed-mode supervisor). Beside them: `backends` (the
llama-cpp-python backend, served in-process), `cli` (the one `vcache` command and its
settings), `serve` (the wiring every serve mode shares) and `errors` (the proxy's one error
hierarchy, in llama-server's error shape). See docs/architecture.md.
"""
