"""Ray actors: thin wrappers around plain classes that can be used and tested without Ray."""
