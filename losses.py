"""Barron's adaptive robust loss and the automodulator's loss terms (paper Eq. 2-11).

Not written yet: issue #3 builds it.
"""
