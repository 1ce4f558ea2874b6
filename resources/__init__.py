"""Bundled data files (sample images, icons, style sheets); resolve them with core.data.resources."""
