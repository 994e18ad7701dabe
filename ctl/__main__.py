"""`python -m ctl`: the same as the xdpflowctl command."""
import sys

from ctl.cli import main

sys.exit(main())
