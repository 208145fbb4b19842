"""The network (torch, train extra), its export, and the runtimes (engines.runtime, no torch).

Importing this package imports nothing heavy: torch is loaded only by the training/export modules.
"""
