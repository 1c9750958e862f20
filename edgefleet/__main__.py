import sys

from edgefleet.cli import main

sys.exit(main())
