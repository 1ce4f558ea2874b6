"""Quantization primitives: integer dtypes (`dtypes`), modes (`mode`) and observers (`observers`)."""
