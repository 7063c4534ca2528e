"""One module per model family, each with a ``FAMILY`` object (see `vision_cache.synthetic.family`).

A module here is found through `vision_cache.synthetic.registry`, which lists it by name.
"""
