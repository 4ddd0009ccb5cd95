"""The error types of the store and the analyses, at the bottom of the package so every module can raise them.

`AnalysisError` is a `StoreError`, so the `transferlab` CLI reports either as `transferlab: error: ...`
(exit 2) without knowing about the analysis modules.
"""


class StoreError(RuntimeError):
    """The results location cannot be used (missing, not writable, corrupt)."""


class AnalysisError(StoreError):
    """A user error in an analysis request: unknown selector, setup without data, empty store."""
