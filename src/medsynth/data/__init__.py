"""Data layer: file io, manifests, importers, preparation, datasets and phantoms."""
