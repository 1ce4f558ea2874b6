"""Bundled data and image handling: decoding and preprocessing photos, the patch grid, bundled resources."""
