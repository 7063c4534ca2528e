"""Finding images in requests and loading them.

`slots` finds every place an image can sit in a request body, for each endpoint that takes
images, and swaps it for a package; `media` loads what a client named by URL or path (under
`ssrf`'s fetch policy, which decides which addresses may be reached); `inspection` checks an
image's header (format, size) before anything decodes it.
"""
