"""The fleet's shared tier: packages in Redis, so a fleet of proxies encodes each image once.

`tier` is the tier itself (Redis or Redis Cluster, or a null tier when off), `value` the
framing of one stored value, `breaker` the circuit breaker that keeps a sick Redis from
slowing requests. See docs/scaling.md.
"""
