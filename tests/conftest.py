"""Shared by every tier: this directory on sys.path (pytest's rootdir import mode puts a
conftest's directory there), so tests import `fuzzing` (Hypothesis helpers of the fuzz
tests, issue 14)."""
