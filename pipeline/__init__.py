"""The batch pipeline: listing, loading, Ray actors, Parquet archives, manifests and verification."""
