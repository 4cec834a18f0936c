"""The console scripts: one straight-line entry point per command (``towerrec-<name>``).

A module here parses its command line (Hydra or argparse), calls the library's work in ``data/``,
``models/``, ``evaluation/``, ``retrieval/`` and ``serve/``, and prints; nothing below imports it.
"""
