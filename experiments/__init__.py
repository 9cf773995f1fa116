"""Scenario-driven experiments: TOML scenarios -> validated sweep points -> engines -> results.

``keys`` declares every scenario key once; ``schema`` parses and validates scenario files and
expands sweeps; ``configs`` derives each point's engine settings; ``engines`` runs a point on the
batched online engine or through Flower (``flower_engine``); ``driver`` runs a sweep with
verified, resumable result parts and writes tidy/summary CSVs and meta.json; ``report`` draws the
table and plots; ``cli`` is the ``psfed-robust`` command. See docs/scenarios.md.
"""
