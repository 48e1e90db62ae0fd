"""The demo door: `python -m demo` (what `make demo` runs); see demo/__main__.py."""
