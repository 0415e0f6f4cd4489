import sys

from ilnas.cli import main

sys.exit(main())
