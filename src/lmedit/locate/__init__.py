"""Shared locate-then-edit machinery: keys k*, values v*, solvers, layer spreading."""
