"""Tests of export, loading and querying of FAISS indexes (a package, so its conftest has its own name)."""
