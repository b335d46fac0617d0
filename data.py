"""Data sets: the embedded `shapes` default, image folders, FFHQ, CelebA-HQ and LSUN (lmdb).

Not written yet: issue #4 builds it. Nothing here pretends to load data.
"""
