import sys

from rsavq.cli import main

sys.exit(main())
