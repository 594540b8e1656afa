import sys

from sknf.cli import main

sys.exit(main())
