"""Style mixing, reconstruction, random and conditional samples, interpolation, from a checkpoint.

Not written yet: issue #6 builds it on model.load_checkpoint (which works today).
"""
import sys

if __name__ == '__main__':
    sys.exit('sample.py is not written yet (issue #6); it needs a checkpoint from train.py (issue #5)')
