"""`python -m influence_client.cli`: the `influence` command."""

import sys

from influence_client.cli.main import main

sys.exit(main())
