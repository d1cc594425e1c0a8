import sys

from asyncsgd.cli import main

sys.exit(main())
