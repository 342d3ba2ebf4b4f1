import sys

from deeplinear.cli import main

sys.exit(main())
