"""What the coordinator tells the people who run it: event records and their sinks
(:mod:`.events`), emitted where transitions are stored (:mod:`.observed_store`)."""
