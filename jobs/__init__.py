"""The `diffarc` command line: parse arguments, then call the pipeline."""
