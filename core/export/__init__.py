"""Circle export: the pipeline, the verdict, ONE's runtime, graph edits and config export for other toolchains."""
