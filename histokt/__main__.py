import sys

from histokt.cli import main

sys.exit(main())
