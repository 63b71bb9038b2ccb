"""Pure security primitives both sides need: device keys and their proofs, secrets stored
only as hashes, and token-bucket rate limits. No network, no storage."""
