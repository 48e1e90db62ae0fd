"""`python -m dataprep`: raw datasets -> WebDataset shards (the library side is managertower.data.prep)."""
