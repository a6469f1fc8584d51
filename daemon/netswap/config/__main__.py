"""`python3 -m netswap.config`: print the configuration reference (docs/config-reference.md carries it)."""

from .reference import reference_table

print(reference_table(), end="")
