"""On-device runtime: load a bundle, sample with numpy, time it, compare with the reference.

Imports numpy, soundfile and the target's own runtime only: never torch, never toolkit.
"""
