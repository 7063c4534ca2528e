"""What runs beside a proxy: warm-up and reference packs.

`warmup` pre-encodes folders or manifests of images through a running proxy's admin API, so the
first real request already hits; `pack` writes warmed entries to one file and loads them into
another machine's store.
"""
