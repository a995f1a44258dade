"""Benchmarks that can be rerun: every number quoted in benchmarks/README.md comes from one of these commands."""
