"""Evaluation harness for scope.py: benchmark registry, loaders and metrics (issue: eval/)."""
