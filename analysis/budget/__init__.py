"""Budgeted transfer grids (issue 19): replay of released runs, a predictor of the transfer matrix,
budget policies with a Tune-Searcher-like interface, and the held-out-seed evaluation."""
