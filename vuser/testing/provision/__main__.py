"""``python3 -m vuser.testing.provision``: see vuser.testing.provision.cli."""

import sys

from vuser.testing.provision.cli import main

sys.exit(main(prog="python3 -m vuser.testing.provision"))
