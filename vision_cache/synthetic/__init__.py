"""Deterministic random-weight models and test media, for tests, benchmarks and the demo.

No model weights can be downloaded here, so tests run on vision-language models this package
writes (GGUF files, with the `gguf` package): `models.generate` writes one family at one size
(``tiny`` for tests, ``demo``, ``realistic`` for benchmarks), `registry` lists the families
(one module each in `families`, behind the `family.Family` interface), and `images` draws
clearly different test images. The pieces families share: `spec` (shapes and the weight
shaping that makes greedy output depend on the image), `vocab`, `tensors`, `gguf_file`.

The weights are shaped so that greedy output depends on the image (see `spec.Shaping`);
naive random weights answer the same whatever the image. Command line:
``python -m vision_cache.synthetic --all --out DIR``.
"""
