import sys

from mixsel.cli import main

sys.exit(main())
