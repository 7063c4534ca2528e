"""The side that faces clients: the aiohttp application that looks like llama-server.

`app` routes every request (images swapped for cached packages on the endpoints that take
them, everything else relayed untouched), `admin` serves the proxy's own /vcache/ endpoints,
`state` holds what every handler needs (`Proxy`, `Limits`), `body` reads request bodies under
the size limit, `budget` bounds the bytes of all bodies held at once, `metrics` renders the
Prometheus metrics, and `site` (with `listen`, the addresses) serves an app and runs it until
a signal, for every serve mode.
"""
