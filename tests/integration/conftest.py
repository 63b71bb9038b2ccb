from harness import coordinator  # noqa: F401 - the fixture, for every integration test
