"""Backends served in-process instead of an upstream llama-server.

`llama_cpp` is `vcache serve --backend llama-cpp-python`: an OpenAI-compatible chat API on one
``llama_cpp.Llama`` whose chat handler decodes cached packages.
"""
