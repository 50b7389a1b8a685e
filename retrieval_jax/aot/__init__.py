"""Ahead-of-time pod rehearsal (`--mode=compile`): the real programs compiled for a TPU topology.

chips.py (the chip table), topology.py (topology and mesh), programs.py (what a run
executes, as abstract shapes), collectives.py (the partitioned HLO's collectives),
analysis.py (memory, cost, roofline of one compiled program), report.py (table, JSON, the
fit check) and mode.py (the mode itself, with the largest-batch search).
"""
