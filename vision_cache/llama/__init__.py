"""llama.cpp bindings: what runs the vision encoder in this process, and the server build.

`libs` loads llama.cpp's shared libraries (a build of ours, or llama-cpp-python's own);
`mtmd` drives its multimodal library to encode an image into a package; `chat_handler` is a
llama-cpp-python chat handler that decodes cached packages instead of re-encoding images;
`server_build` builds the patched llama-server from llama.cpp source (`vcache build-server`).
"""
