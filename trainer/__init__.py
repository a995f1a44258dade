"""Optimisation loops: q_v inference per pair, the theta/q_f step, training and testing runs."""
