"""Progressive training of the automodulator, one process or many through torchrun.

Not written yet: issue #5 builds it (it needs losses.py and data.py first).
"""
import sys

if __name__ == '__main__':
    sys.exit('train.py is not written yet (issue #5); model.py is ready: `python model.py` prints its sizes')
