import sys

from ilnas.cli import program

sys.exit(program())
