"""Primitives of secure aggregation (SecAgg+, Bell et al. 2020; Bonawitz et al. 2017): Shamir
sharing, key agreement and authenticated encryption, PRG mask expansion, quantization.
Pure functions; the protocol's stages build on them."""
