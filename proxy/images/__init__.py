"""Finding images and audio clips in requests and loading them.

`slots` finds every place an image or a clip can sit in a request body, for each endpoint that
takes media, and swaps it for a package; `modality` tells audio from images by their bytes,
as llama-server does; `media` loads what a client named by URL or path (under
`ssrf`'s fetch policy, which decides which addresses may be reached); `inspection` checks an
image's header (format, size) before anything decodes it.
"""
