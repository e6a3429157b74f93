"""Example sources: PixMo sets from their published parquet (`pixmo`), user data (`custom`),
synthetic PixMo-style data (`synthetic`). Each yields Molmo example dicts (see `pixmo` docstring)."""
