"""`python -m translator` runs the `coap-ws-gateway` command line."""

import sys

from translator.cli import main

sys.exit(main())
