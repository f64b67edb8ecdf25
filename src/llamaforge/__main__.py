import sys

from llamaforge.cli.main import main

sys.exit(main())
