"""HDF5 sample store, readers, samplers, converters and synthetic generators."""
