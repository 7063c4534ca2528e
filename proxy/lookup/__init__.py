"""From an image to its package: the heart of the request path.

`package_lookup.PackageLookup` keys an image (content hash plus the upstream's namespace), then
looks in the local store, then the fleet's shared tier, and only then has it encoded, by
upstream or by `local_encoder` (encoder worker processes on llama.cpp's mtmd library); one
encode per key however many requests ask at once.
"""
