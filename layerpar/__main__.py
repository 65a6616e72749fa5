import sys

from layerpar.cli import main

sys.exit(main())
