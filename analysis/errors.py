"""The one error type of the analyses.

A subclass of `StoreError` so the `transferlab` CLI reports it as `transferlab: error: ...` (exit 2)
without knowing about the analysis modules.
"""

from analysis.store import StoreError


class AnalysisError(StoreError):
    """A user error in an analysis request: unknown selector, setup without data, empty store."""
