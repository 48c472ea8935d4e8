"""Test helpers: real processes, tokens, seeded rows and scripted models, shared by the test modules."""
