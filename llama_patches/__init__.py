"""vcache's patches to llama.cpp, installed with the package as data.

vision_cache.llama.server_build applies them; see README.md beside this file.
"""
