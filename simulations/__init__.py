"""In-process federations that reuse core/ and the coordinator's round logic (issue: research
simulations). The data generators they use already live in :mod:`core.data`."""
