"""Benchmarks behind `gallery bench ...`: each measures alternatives side by side in one process and
prints the ratios next to the raw figures (speed goals are checked here, not in timed unit tests).

May import every stage below it (data, model, training, retrieval); nothing imports it but the CLI.
"""
