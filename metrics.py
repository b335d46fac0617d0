"""FID with its own Inception, LPIPS, PPL and a ground-truth mixing score.

Not written yet: issue #7 builds it.
"""
import sys

if __name__ == '__main__':
    sys.exit('metrics.py is not written yet (issue #7)')
