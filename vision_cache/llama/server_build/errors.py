"""Why a llama-server build stopped; each message says what to do about it.

* BuildError (vision_cache.errors.VisionCacheError)
  + ToolMissing        a program or library the build needs is not installed (names the packages)
  + SourceError        no usable llama.cpp source tree
  + PatchError         a patch does not apply to the source tree
  + CompileError       CMake or the compiler failed (the log's tail, and where the log is)
  + SmokeTestError     the built binary does not start, or lacks the patches
"""

from __future__ import annotations

from vision_cache.errors import VisionCacheError


class BuildError(VisionCacheError):
    """A build step failed; the message says which and what to do."""


class ToolMissing(BuildError):
    """A program or library the build needs is not installed."""


class SourceError(BuildError):
    """The llama.cpp source cannot be fetched, or a given tree is not llama.cpp."""


class PatchError(BuildError):
    """A patch does not apply to the llama.cpp tree."""


class CompileError(BuildError):
    """CMake configure or compile failed."""


class SmokeTestError(BuildError):
    """The built llama-server does not run, or is not the variant it should be."""
