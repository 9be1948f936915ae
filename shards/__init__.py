"""Offline packing of ImageNet-layout folders into WebDataset tar shards with DALI indexes and a manifest."""
