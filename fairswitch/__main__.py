"""``python -m fairswitch ...``: the ``fairswitch`` console script."""

import sys

from fairswitch.cli.main import main

sys.exit(main())
